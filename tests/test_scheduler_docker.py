"""A job on a real dockerd in a lab host, through `consulate agent --scheduler`: the
containers are registered by the registrator and reachable by name through the mesh,
a killed container is restarted, a stopped job leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scheduler_support import consulate, until, web_job

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent
from consulate.control.labdocker import LabDocker, busybox_image_tar
from consulate.control.scheduler.drivers import ExecDriver, TaskSpec

pytestmark = pytest.mark.lab

WEB = web_job(2, restart={"attempts": 3, "delay": "1s", "interval": "1m"})


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[labmod.Lab, LabDocker, LabAgent, Path]]:
    work = tmp_path_factory.mktemp("scheduler-docker")
    with labmod.up(hosts=1, containers=1) as lab:
        daemon = LabDocker(lab, 1, work / "dockerd").start()
        agent: LabAgent | None = None
        try:
            daemon.import_image(busybox_image_tar())
            agent = LabAgent(lab, 1, work / "data", work / "agent.log",
                             extra_args=["--docker-host", daemon.url, "--scheduler"]).start()
            yield lab, daemon, agent, work
        finally:
            if agent is not None:
                agent.stop()
            daemon.stop()


def status(agent: LabAgent) -> dict[str, Any]:
    result: dict[str, Any] = agent.api("GET", "/v1/job/web")
    return result


def catalog(agent: LabAgent) -> list[tuple[str, int]]:
    return sorted((e["ServiceAddress"], e["ServicePort"])
                  for e in agent.api("GET", "/v1/catalog/service/web"))


def test_docker_job_runs_is_reachable_restarts_and_stops(
        host: tuple[labmod.Lab, LabDocker, LabAgent, Path]) -> None:
    lab, daemon, agent, work = host
    until(lambda: [n["name"] for n in agent.api("GET", "/v1/nodes")] == ["h1"])
    [node] = agent.api("GET", "/v1/nodes")
    assert node["drivers"] == ["docker", "exec"]
    assert node["attributes"]["driver.docker"] == "1"
    job_file = work / "web.json"
    job_file.write_text(json.dumps(WEB))

    ran = consulate(lab, "h1", "job", "run", str(job_file))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.startswith('==> Job "web" submitted\n')
    until(lambda: status(agent)["summary"]["web"]["running"] == 2)
    bridge = lab.bridge_ip(1)
    until(lambda: catalog(agent) == [(bridge, 20000), (bridge, 20001)])

    answers = set()
    for _ in range(6):
        fetched = lab.exec("h1c1", ["wget", "-q", "-O-", "-T", "5",
                                    "http://web.service.consul/"],
                           capture_output=True, text=True, timeout=20)
        assert fetched.returncode == 0, fetched.stderr
        answers.add(fetched.stdout)
    assert answers <= {"hello from web.web[0]\n", "hello from web.web[1]\n"}
    assert answers

    first = next(a for a in status(agent)["allocations"] if a["name"] == "web.web[0]")
    [container] = [c for c in daemon.api.containers()
                   if c["Labels"].get("consulate.alloc_id") == first["id"]]
    daemon.api.kill(container["Id"])
    until(lambda: next(a for a in status(agent)["allocations"]
                       if a["id"] == first["id"])["restarts"] == 1)
    until(lambda: next(a for a in status(agent)["allocations"]
                       if a["id"] == first["id"])["status"] == "running")
    history = next(a for a in status(agent)["allocations"] if a["id"] == first["id"])["history"]
    assert [h["status"] for h in history] == ["pending", "running", "restarting", "running"]
    assert history[2]["detail"] == "exit status 137; restart 1 in 1.0s"
    until(lambda: catalog(agent) == [(bridge, 20000), (bridge, 20001)])

    explained = consulate(lab, "h1", "alloc", "explain", first["id"][:8])
    assert explained.returncode == 0
    assert "Placed on   = h1\n" in explained.stdout

    stopped = consulate(lab, "h1", "job", "stop", "web")
    assert stopped.returncode == 0, stopped.stderr
    until(lambda: daemon.api.containers(all=True) == [])
    until(lambda: catalog(agent) == [])
    assert {a["status"] for a in status(agent)["allocations"]} == {"complete"}
    assert status(agent)["status"] == "dead"


async def test_exec_driver_runs_the_task_in_a_lab_container_namespace(
        host: tuple[labmod.Lab, LabDocker, LabAgent, Path]) -> None:
    lab, _, _, work = host
    (work / "www").mkdir(exist_ok=True)
    (work / "www" / "index.html").write_text("hello from exec\n")
    driver = ExecDriver(netns=lab.container_ns(1, 1))
    task = TaskSpec("a" * 32, "site.site[0]", "site", "exec", "", "busybox",
                    ("httpd", "-f", "-p", "8080", "-h", str(work / "www")))
    handle = await driver.start(task)
    try:
        fetched = ""
        for _ in range(50):  # until httpd listens
            done = lab.exec("h1", ["wget", "-q", "-O-", "-T", "2",
                                   f"http://{lab.container_ip(1, 1)}:8080/"],
                            capture_output=True, text=True, timeout=20)
            if done.returncode == 0:
                fetched = done.stdout
                break
            await asyncio.sleep(0.1)
        assert fetched == "hello from exec\n"
        own = os.stat(f"/proc/{handle}/ns/net").st_ino  # nsenter became httpd: same pid
        assert own == os.stat(f"/var/run/netns/{lab.container_ns(1, 1)}").st_ino
    finally:
        await driver.stop(handle)
    assert not os.path.exists(f"/proc/{handle}/ns/net")
