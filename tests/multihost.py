"""What the many-host lab tests share: waiting on agents, cutting a host off the
lab's fabric, and the cut-off scenario every registry layout must pass."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from conftest import Peers

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent


def until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


def endpoints(agent: LabAgent, service: str) -> int:
    """How many endpoints the agent's route table holds for ``service``."""
    routes = agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]
    return int(routes.get(service, {}).get("endpoints", 0))


def link(lab: labmod.Lab, host: int, state: str) -> None:
    """Cut a host off the lab's fabric (or plug it back): its veth's far end."""
    subprocess.run(["ip", "-n", lab.fabric_ns, "link", "set", f"h{host}", state], check=True)


def cut_off_and_back(lab: labmod.Lab, agents: dict[int, LabAgent], service: str,
                     liveness_ttl: float) -> float:
    """Instances on h2 and h3, h3 cut off then plugged back: seen from h1 and h2,
    h3's instance leaves the routes, new connections go to h2's only, and it
    returns. Returns how long after the cut h1's routes dropped it."""
    peers = Peers(lab)
    port = 7100
    try:
        for i in (2, 3):
            peers.serve(f"h{i}c1", f"{service}-h{i}", port)
            agents[i].register(service, f"{service}-h{i}", lab.container_ip(i, 1), port)
        for i in (1, 2):
            until(lambda i=i: endpoints(agents[i], service) == 2)  # type: ignore[misc]
        link(lab, 3, "down")
        try:
            cut_at = time.monotonic()
            # The agent of h3 can no longer renew its instance: the registry lets it go
            # after the TTL. The wait allows for an etcd leader election (which
            # extends leases) on a busy machine.
            until(lambda: endpoints(agents[1], service) == 1, liveness_ttl + 10)
            dropped_after = time.monotonic() - cut_at
            until(lambda: endpoints(agents[2], service) == 1, 5)
            for i in (1, 2):
                results = peers.connect(f"h{i}c1", f"{service}.service.consul", port,
                                        count=4, size=1000)
                assert [(r["ok"], r["id"]) for r in results] == [(True, f"{service}-h2")] * 4
        finally:
            link(lab, 3, "up")
        until(lambda: endpoints(agents[1], service) == 2, 30)
        results = peers.connect("h1c1", f"{service}.service.consul", port, count=4, size=1000)
        assert {r["id"] for r in results} == {f"{service}-h2", f"{service}-h3"}
        return dropped_after
    finally:
        peers.stop_all()
