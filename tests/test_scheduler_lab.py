"""Acceptance of issue 10 on three lab hosts: etcd (one member per host), a dockerd
and `consulate agent --scheduler` on each. A service job of count 4 with spread
lands 2/1/1 and is reachable by name through the mesh; a host cut off from the
fabric has its allocation replaced on the others within the node TTL + 5 s, while a
client keeps connecting by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scheduler_support import consulate, until, web_job

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent
from consulate.control.labdocker import LabDocker, busybox_image_tar
from consulate.control.labetcd import lab_cluster
from consulate.control.scheduler.runtime import NODE_TTL

pytestmark = pytest.mark.lab

HOSTS = (1, 2, 3)
WEB = web_job(4)
# A client in h1c1 fetching web.service.consul every 0.2 s, one line per attempt.
CLIENT = ("while true; do if wget -q -O- -T 8 http://web.service.consul/ >/dev/null; "
          "then echo ok; else echo fail; fi; sleep 0.2; done")

Cluster = tuple[labmod.Lab, dict[int, LabAgent], dict[int, LabDocker], Path]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("scheduler-lab")
    with labmod.up(hosts=3, containers=1) as lab, lab_cluster(lab, work, HOSTS) as etcd:
        daemons: dict[int, LabDocker] = {}
        agents: dict[int, LabAgent] = {}
        registry = etcd.registry
        try:
            for i in HOSTS:
                daemons[i] = LabDocker(lab, i, work / f"dockerd-h{i}").start()
                daemons[i].import_image(busybox_image_tar())
            for i in HOSTS:  # h1 first: the oldest candidate leads
                agents[i] = LabAgent(lab, i, work / f"agent-h{i}", work / f"agent-h{i}.log",
                                     extra_args=["--registry", registry, "--scheduler",
                                                 "--scheduler-rpc-addr",
                                                 f"{lab.host_ip(i)}:4647",
                                                 "--docker-host", daemons[i].url]).start()
            yield lab, agents, daemons, work
        finally:
            for agent in agents.values():
                agent.stop()
            for daemon in daemons.values():
                daemon.stop()


def job(agent: LabAgent) -> dict[str, Any]:
    found: dict[str, Any] = agent.api("GET", "/v1/job/web")
    return found


def running_on(agent: LabAgent) -> Counter[str]:
    return Counter(a["node"] for a in job(agent)["allocations"] if a["status"] == "running")


def test_spread_job_survives_a_host_cut_off(cluster: Cluster) -> None:
    lab, agents, daemons, work = cluster
    until(lambda: [n["name"] for n in agents[2].api("GET", "/v1/nodes")] == ["h1", "h2", "h3"])
    job_file = work / "web.json"
    job_file.write_text(json.dumps(WEB))
    # submitted on h2, which forwards it to the leader (h1) over duplex
    ran = consulate(lab, "h2", "job", "run", str(job_file))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    until(lambda: running_on(agents[1]) == {"h1": 2, "h2": 1, "h3": 1}, 60)
    until(lambda: len(agents[1].api("GET", "/v1/catalog/service/web")) == 4, 30)
    answers = {lab.exec("h1c1", ["wget", "-q", "-O-", "-T", "8", "http://web.service.consul/"],
                        capture_output=True, text=True, timeout=20).stdout for _ in range(8)}
    assert answers <= {f"hello from web.web[{i}]\n" for i in range(4)} and answers

    client = lab.popen("h1c1", ["sh", "-c", CLIENT], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        [lost] = [a for a in job(agents[1])["allocations"] if a["node"] == "h3"]
        cut = time.monotonic()
        lab.exec("fabric", ["ip", "link", "set", "h3", "down"], check=True)
        until(lambda: any(a["previous"] == lost["id"] for a in job(agents[1])["allocations"]),
              NODE_TTL + 5)
        replaced = time.monotonic() - cut
        until(lambda: running_on(agents[1]) == {"h1": 2, "h2": 2}, 30)
        running = time.monotonic() - cut
        assert len(daemons[2].api.containers()) == 2  # the replacement runs on h2's dockerd
        time.sleep(3)
    finally:
        os.killpg(client.pid, signal.SIGTERM)  # its group (lab.popen): the loop and its wget
        out, _ = client.communicate(timeout=20)
    attempts = Counter(out.split())
    status = job(agents[1])
    [gone] = [a for a in status["allocations"] if a["id"] == lost["id"]]
    assert gone["status"] == "lost"
    assert gone["history"][-1]["detail"] == "node h3 missed its heartbeat TTL"
    print(f"cut -> replacement placed {replaced:.1f}s, running {running:.1f}s; client "
          f"{dict(attempts)}")
    assert replaced <= NODE_TTL + 5
    assert attempts["fail"] == 0 and attempts["ok"] > 20, attempts
