"""End to end in the lab: ``consulate agent`` runs the registrator for its host's dockerd.

A container started with ``docker run -e SERVICE_NAME=web -p 8080:80`` becomes
``web.service.consul`` for every lab container at once, and leaves with it; an
agent restarted after a container went away while it was down holds no ghost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent
from consulate.control.labdocker import LabDocker, busybox_image_tar

pytestmark = pytest.mark.lab

HTTPD = ["sh", "-c", "mkdir /www; echo hello from docker >/www/index.html; "
                     "httpd -f -p 80 -h /www"]


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[labmod.Lab, LabDocker, Path]]:
    work = tmp_path_factory.mktemp("registrator-agent")
    with labmod.up(hosts=1, containers=1) as lab:
        daemon = LabDocker(lab, 1, work / "dockerd").start()
        try:
            daemon.import_image(busybox_image_tar())
            yield lab, daemon, work
        finally:
            daemon.stop()


def start_agent(lab: labmod.Lab, daemon: LabDocker, work: Path) -> LabAgent:
    return LabAgent(lab, 1, work / "data", work / "agent.log",
                    extra_args=["--docker-host", daemon.url]).start()


def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.1)


def web_ids(agent: LabAgent) -> list[str]:
    return [e["ServiceID"] for e in agent.api("GET", "/v1/catalog/service/web")]


def test_docker_run_is_reachable_by_name_from_a_lab_container(
        host: tuple[labmod.Lab, LabDocker, Path]) -> None:
    lab, daemon, work = host
    agent = start_agent(lab, daemon, work)
    try:
        cid = daemon.run("web1", HTTPD, env={"SERVICE_NAME": "web"}, publish={"80/tcp": 8080})
        until(lambda: web_ids(agent) == ["h1:web1:80"])
        [entry] = agent.api("GET", "/v1/catalog/service/web")
        assert (entry["ServiceAddress"], entry["ServicePort"]) == (lab.bridge_ip(1), 8080)
        fetched = lab.exec("h1c1", ["wget", "-q", "-O-", "-T", "5", "http://web.service.consul/"],
                           capture_output=True, text=True, timeout=20)
        assert (fetched.returncode, fetched.stdout) == (0, "hello from docker\n"), fetched.stderr
        daemon.api.remove_container(cid, force=True)
        until(lambda: web_ids(agent) == [])
    finally:
        agent.stop()
    assert "event=registrator state=on" in agent.log()


def test_an_agent_restarted_holds_no_ghost(host: tuple[labmod.Lab, LabDocker, Path]) -> None:
    lab, daemon, work = host
    agent = start_agent(lab, daemon, work)
    try:
        daemon.run("web2", HTTPD, env={"SERVICE_NAME": "web"}, publish={"80/tcp": 8081})
        stays = daemon.run("web3", HTTPD, env={"SERVICE_NAME": "web"}, publish={"80/tcp": 8082})
        until(lambda: web_ids(agent) == ["h1:web2:80", "h1:web3:80"])
    finally:
        agent.stop()
    daemon.api.remove_container("web2", force=True)  # while no agent watches
    agent = start_agent(lab, daemon, work)  # same data dir: the registry kept web2
    try:
        until(lambda: web_ids(agent) == ["h1:web3:80"])
    finally:
        agent.stop()
        daemon.api.remove_container(stays, force=True)
    assert "dangling: h1:web2:80" in agent.log()


def test_no_docker_socket_no_registrator(host: tuple[labmod.Lab, LabDocker, Path],
                                         tmp_path: Path) -> None:
    lab, _, _ = host
    agent = LabAgent(lab, 1, tmp_path / "data", tmp_path / "agent.log",
                     extra_args=["--docker-host", f"unix://{tmp_path}/none.sock"]).start()
    agent.stop()
    assert f"event=registrator state=off reason='no Docker socket at {tmp_path}/none.sock'" \
        in agent.log()


def test_service_checks_are_run_by_the_agent(host: tuple[labmod.Lab, LabDocker, Path]) -> None:
    """SERVICE_CHECK_HTTP becomes a check the agent probes: the container whose
    port answers is passing, the one whose port has nothing behind it goes
    critical and receives no traffic by name."""
    lab, daemon, work = host
    agent = start_agent(lab, daemon, work)
    check = {"SERVICE_NAME": "web", "SERVICE_CHECK_HTTP": "/", "SERVICE_CHECK_INTERVAL": "1s"}
    try:
        daemon.run("web4", HTTPD, env=check, publish={"80/tcp": 8083})
        daemon.run("web5", ["sleep", "3600"], env=check, publish={"80/tcp": 8084})
        until(lambda: web_ids(agent) == ["h1:web4:80", "h1:web5:80"])

        def statuses() -> dict[str, str]:
            return {c["ServiceID"]: c["Status"]
                    for c in agent.api("GET", "/v1/health/checks/web")}
        until(lambda: statuses() == {"h1:web4:80": "passing", "h1:web5:80": "critical"},
              timeout=20)
        healthy = agent.api("GET", "/v1/health/service/web?passing")
        assert [e["Service"]["ID"] for e in healthy] == ["h1:web4:80"]
        assert healthy[0]["Checks"][0]["Output"] == (
            f"HTTP GET http://{lab.bridge_ip(1)}:8083/: 200 OK Output: hello from docker\n")
        for _ in range(4):  # round robin would alternate: only the passing one is routed
            fetched = lab.exec("h1c1", ["wget", "-q", "-O-", "-T", "5",
                                        "http://web.service.consul/"],
                               capture_output=True, text=True, timeout=20)
            assert (fetched.returncode, fetched.stdout) == (0, "hello from docker\n")
    finally:
        agent.stop()
        for name in ("web4", "web5"):
            daemon.api.remove_container(name, force=True)
