"""Chaos in a 3-host mesh: for 60 s, backends and agents are killed (-9) and started
again at random while a container keeps connecting by name.

Every connection that fails must be explained by a backend killed while that
connection was using it; the proxy's retries and the registry's liveness absorb
everything else (a dead backend refuses, the next endpoint is tried; an agent
killed on h2 or h3 takes its instance out of the routes until it is back, while
the instance itself keeps serving). Afterwards nothing is left: no rule, no
namespace, no process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import NETSVC, Peers
from multihost import endpoints, until

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent
from consulate.control.labetcd import lab_cluster

pytestmark = pytest.mark.lab

SECONDS = 60.0
HOSTS = (1, 2, 3)
PORT = 7200
SEED = 20261204


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kills_and_restarts_lose_no_connection_to_a_live_endpoint(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    events: list[tuple[float, str, str]] = []  # (epoch, what, whom)
    started_pids: list[int] = []
    with labmod.up(hosts=3, containers=2) as lab, lab_cluster(lab, tmp_path, HOSTS) as etcd:
        agents: dict[int, LabAgent] = {}
        peers = Peers(lab)
        registry = etcd.registry
        try:
            for i in HOSTS:
                agents[i] = LabAgent(lab, i, tmp_path / f"agent-h{i}", tmp_path / f"h{i}.log",
                                     extra_args=["--registry", registry, "--liveness-ttl", "3s",
                                                 "--connect-timeout", "1"]).start()
                peers.serve(f"h{i}c1", f"chaos-h{i}", PORT)
                agents[i].register("chaos", f"chaos-h{i}", lab.container_ip(i, 1), PORT)
            until(lambda: endpoints(agents[1], "chaos") == 3)
            client = lab.popen("h1c2", [sys.executable, NETSVC, "connect", "--host",
                                        "chaos.service.consul", "--port", str(PORT),
                                        "--size", "20000", "--timeout", "5", "--seconds",
                                        str(SECONDS)], stdout=subprocess.PIPE)
            started_pids.append(client.pid)
            deadline = time.monotonic() + SECONDS - 8
            while time.monotonic() < deadline:
                if rng.random() < 0.5:
                    alive = [i for i in HOSTS if f"chaos-h{i}" in peers.servers]
                    if len(alive) > 1:  # one instance always serves
                        victim = f"chaos-h{rng.choice(alive)}"
                        events.append((time.time(), "kill-backend", victim))
                        peers.kill(victim)
                        time.sleep(rng.uniform(0.5, 3))
                        host = int(victim[-1])
                        peers.serve(f"h{host}c1", victim, PORT)
                        events.append((time.time(), "start-backend", victim))
                else:
                    host = rng.choice((2, 3))
                    process = agents[host].process
                    assert process is not None
                    events.append((time.time(), "kill-agent", f"h{host}"))
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()
                    agents[host].stop()
                    time.sleep(rng.uniform(0.5, 4))
                    agents[host].start()
                    started_pids.append(agents[host].process.pid)  # type: ignore[union-attr]
                    events.append((time.time(), "start-agent", f"h{host}"))
                time.sleep(rng.uniform(0.2, 1.5))
            output, _ = client.communicate(timeout=SECONDS)
            results = [json.loads(line) for line in output.splitlines()]
            # Once the routes converge every instance is back and serves.
            until(lambda: endpoints(agents[1], "chaos") == 3, 40)
            final = peers.connect("h1c2", "chaos.service.consul", PORT, count=6, size=1000)
            assert {r["id"] for r in final} == {"chaos-h1", "chaos-h2", "chaos-h3"}
        finally:
            started_pids += [p.pid for p in peers.servers.values()]
            peers.stop_all()
            for agent in agents.values():
                if agent.process is not None:
                    started_pids.append(agent.process.pid)
                agent.stop()
        for i in HOSTS:  # every agent took its rules with it
            assert "CONSULATE" not in lab.exec(f"h{i}", ["iptables-save", "-t", "nat"],
                                              capture_output=True, text=True).stdout
    assert labmod.namespaces_of(lab.name) == []
    assert [pid for pid in started_pids if _alive(pid)] == []

    kills = [(t, whom) for t, what, whom in events if what == "kill-backend"]

    def explained(result: dict[str, object]) -> bool:
        """Failed because the backend it was using died under it."""
        begun = float(result["t"])  # type: ignore[arg-type]
        ended = begun + float(result["elapsed"])  # type: ignore[arg-type]
        return any(begun - 0.05 <= t <= ended + 0.05 and result.get("id") in ("", whom)
                   for t, whom in kills)

    failures = [r for r in results if not r["ok"]]
    unexplained = [r for r in failures if not explained(r)]
    print(f"{len(results)} connections, {len(failures)} failed, all explained by "
          f"{len(kills)} backend kills; events: {len(events)}")
    assert len(results) > 100
    assert unexplained == [], (unexplained, events)
