"""Balancers and outlier ejection end to end, over both relays, in a lab.

Host h1 runs a real agent (once with the native engine, once with the Python
relay) with a short base ejection time; containers c1-c3 run echo servers that
greet with their instance id, c4 and c5 are clients. The choice each relay makes
is checked against the pure balancers of proxy/balance.py.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Peers

from consulate.control.lab import Lab
from consulate.control.labagent import LabAgent
from consulate.proxy.balance import PickContext, RendezvousHash
from consulate.proxy.table import Endpoint

pytestmark = pytest.mark.lab

BASE_EJECTION = 3.0
AGENT_EXTRA_ARGS = ("--base-ejection-time", str(BASE_EJECTION))
WAIT = 15.0

# Opens COUNT connections, prints each one's greeting (the instance id), then
# holds them open until its stdin closes.
HOLDER = """
import socket, sys
held = []
for _ in range(int(sys.argv[3])):
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    reader = sock.makefile("rb")
    print(reader.readline().decode().strip(), flush=True)
    held.append((sock, reader))
sys.stdin.read()
"""


def register(agent: LabAgent, name: str, instance_id: str, address: str, port: int,
             lb: str = "", weight: int = 1) -> None:
    body: dict[str, Any] = {"ID": instance_id, "Name": name, "Address": address, "Port": port,
                            "Weights": {"Passing": weight, "Warning": 1}}
    if lb:
        body["Meta"] = {"lb": lb}
    agent.api("PUT", "/v1/agent/service/register", body)


def counters(agent: LabAgent, name: str) -> dict[str, int]:
    return dict(agent.api("GET", "/v1/agent/self")["Stats"]["proxy"]["services"][name])


def wait_for(what: str, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not ready():
        assert time.monotonic() < deadline, f"no {what} within {WAIT} s"
        time.sleep(0.05)


def endpoints_of(agent: LabAgent, name: str) -> int:
    services = agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]
    return int(services.get(name, {}).get("endpoints", 0))


def ids(results: list[dict[str, Any]]) -> list[str]:
    assert all(r["ok"] for r in results), results
    return [r["id"] for r in results]


@pytest.fixture
def holder(mesh_lab: Lab) -> Iterator[Callable[[str, str, int, int], list[str]]]:
    """Hold connections open from a container; returns the ids they reached."""
    started: list[subprocess.Popen[bytes]] = []

    def hold(where: str, host: str, port: int, count: int) -> list[str]:
        proc = mesh_lab.popen(where, [sys.executable, "-c", HOLDER, host, str(port), str(count)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        started.append(proc)
        assert proc.stdout is not None
        return [proc.stdout.readline().decode().strip() for _ in range(count)]

    yield hold
    for proc in started:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()


def test_refusing_endpoint_is_ejected_after_five_failures_then_returns(
        mesh_lab: Lab, agent: LabAgent, peers: Peers) -> None:
    peers.serve("h1c1", "ej-1", 7171)
    peers.serve("h1c2", "ej-2", 7171)
    for j in (1, 2, 3):  # nothing listens on c3:7171: refused at once
        register(agent, "ej", f"ej-{j}", mesh_lab.container_ip(1, j), 7171)
    results = peers.connect("h1c4", "ej.service.consul", 7171, count=24)
    assert set(ids(results)) == {"ej-1", "ej-2"}  # every connection served
    down = f"endpoint=ej-3 address={mesh_lab.container_ip(1, 3)}:7171"
    wait_for("ejection log line", lambda: "event=eject service=ej" in agent.log())
    assert (f"event=eject service=ej {down} type=consecutive_connect_failure failures=5 "
            f"num_ejections=1 ejection_time={BASE_EJECTION:.3f}") in agent.log()
    stats = counters(agent, "ej")
    # Round robin made ej-3 the first pick of every third connection until the
    # fifth failure ejected it: no attempt on it after that.
    assert (stats["connect_failures"], stats["ejections"], stats["ejections_active"],
            stats["rejected"]) == (5, 1, 1, 0)

    wait_for("return", lambda: f"event=uneject service=ej {down}" in agent.log())
    assert counters(agent, "ej")["ejections_active"] == 0
    # Back in the pool, still refusing: five more failures, and out for twice as long.
    results = peers.connect("h1c4", "ej.service.consul", 7171, count=24)
    assert set(ids(results)) == {"ej-1", "ej-2"}
    wait_for("second ejection", lambda: "num_ejections=2" in agent.log())
    assert (f"event=eject service=ej {down} type=consecutive_connect_failure failures=5 "
            f"num_ejections=2 ejection_time={2 * BASE_EJECTION:.3f}") in agent.log()
    stats = counters(agent, "ej")
    assert (stats["connect_failures"], stats["ejections"], stats["ejections_active"]) == \
        (10, 2, 1)


def test_never_more_than_half_of_a_pool_is_ejected(
        mesh_lab: Lab, agent: LabAgent, peers: Peers) -> None:
    for j in (1, 2):  # neither listens on 7272
        register(agent, "half", f"half-{j}", mesh_lab.container_ip(1, j), 7272)
    results = peers.connect("h1c4", "half.service.consul", 7272, count=12)
    assert not any(r["ok"] for r in results)
    wait_for("ejection log line", lambda: "event=eject service=half" in agent.log())
    stats = counters(agent, "half")
    # Connections 1-5 try both (10 failures; the 5th ejects half-1, half-2 reaches
    # 5 too but must stay); 6-12 have half-2 alone (7 more).
    assert (stats["connect_failures"], stats["rejected"], stats["ejections"],
            stats["ejections_active"]) == (17, 12, 1, 1)
    assert agent.log().count("event=eject service=half") == 1
    assert "event=eject service=half endpoint=half-1 " in agent.log()


@pytest.mark.parametrize("lb", ["least_conn", "p2c"])
def test_new_connections_go_to_the_endpoint_with_fewer_open(
        mesh_lab: Lab, agent: LabAgent, peers: Peers, lb: str,
        holder: Callable[[str, str, int, int], list[str]]) -> None:
    name, port = f"few-{lb.replace('_', '')}", 7474 if lb == "p2c" else 7575
    peers.serve("h1c1", f"{name}-1", port)
    peers.serve("h1c2", f"{name}-2", port)
    register(agent, name, f"{name}-1", mesh_lab.container_ip(1, 1), port, lb=lb)
    # Two connections held open to the only endpoint, then a second one joins.
    assert holder("h1c5", f"{name}.service.consul", port, 2) == [f"{name}-1"] * 2
    register(agent, name, f"{name}-2", mesh_lab.container_ip(1, 2), port, lb=lb)
    wait_for("second endpoint", lambda: endpoints_of(agent, name) == 2)
    results = peers.connect("h1c4", f"{name}.service.consul", port, count=6)
    assert ids(results) == [f"{name}-2"] * 6  # round robin would alternate
    assert f"event=lb service={name} lb={lb}" in agent.log()


def test_hash_keeps_a_client_on_one_endpoint_and_moves_only_the_removed_ones_clients(
        mesh_lab: Lab, agent: LabAgent, peers: Peers) -> None:
    port = 7373
    for j in (1, 2, 3):
        peers.serve(f"h1c{j}", f"hs-{j}", port)
        register(agent, "hs", f"hs-{j}", mesh_lab.container_ip(1, j), port, lb="hash")
    wait_for("three endpoints", lambda: endpoints_of(agent, "hs") == 3)
    clients = {f"h1c{j}": mesh_lab.container_ip(1, j) for j in (1, 2, 3, 4, 5)}

    def expected(members: list[int]) -> dict[str, str]:
        """The endpoint the pure balancer gives each client (relay.c mirrors it)."""
        pool = [Endpoint("hs", f"hs-{j}", mesh_lab.container_ip(1, j), port) for j in members]
        return {where: RendezvousHash().candidates(
                    pool, 1, PickContext(client=int(ipaddress.IPv4Address(ip))))[0].id
                for where, ip in clients.items()}

    def reached() -> dict[str, str]:
        seen = {}
        for where in clients:
            answered = set(ids(peers.connect(where, "hs.service.consul", port, count=4)))
            assert len(answered) == 1, (where, answered)  # one client IP, one endpoint
            seen[where] = answered.pop()
        return seen

    before = reached()
    assert before == expected([1, 2, 3])
    removed = before["h1c4"]
    agent.api("PUT", f"/v1/agent/service/deregister/{removed}")
    wait_for("two endpoints", lambda: endpoints_of(agent, "hs") == 2)
    after = reached()
    assert after == expected([j for j in (1, 2, 3) if f"hs-{j}" != removed])
    assert {w: e for w, e in after.items() if before[w] != removed} == \
        {w: e for w, e in before.items() if e != removed}  # the others stayed


def test_weighted_follows_the_weights(mesh_lab: Lab, agent: LabAgent, peers: Peers) -> None:
    port = 7676
    peers.serve("h1c1", "wt-1", port)
    peers.serve("h1c2", "wt-2", port)
    register(agent, "wt", "wt-1", mesh_lab.container_ip(1, 1), port, lb="weighted", weight=3)
    register(agent, "wt", "wt-2", mesh_lab.container_ip(1, 2), port, lb="weighted", weight=1)
    wait_for("two endpoints", lambda: endpoints_of(agent, "wt") == 2)
    results = peers.connect("h1c4", "wt.service.consul", port, count=8)
    assert ids(results) == ["wt-1", "wt-1", "wt-2", "wt-1"] * 2  # smooth: 3 to 1


def test_unknown_lb_is_logged_and_round_robin_used(
        mesh_lab: Lab, agent: LabAgent, peers: Peers) -> None:
    port = 7777
    peers.serve("h1c1", "unk-1", port)
    peers.serve("h1c2", "unk-2", port)
    for j in (1, 2):
        register(agent, "unk", f"unk-{j}", mesh_lab.container_ip(1, j), port, lb="fastest")
    wait_for("two endpoints", lambda: endpoints_of(agent, "unk") == 2)
    results = ids(peers.connect("h1c4", "unk.service.consul", port, count=4))
    assert results in (["unk-1", "unk-2"] * 2, ["unk-2", "unk-1"] * 2)
    assert ("event=lb-unknown service=unk lb=fastest using=round_robin error=\"lb='fastest' "
            "is not a balancer: use one of round_robin|least_conn|p2c|hash|weighted; "
            "using round_robin\"") in agent.log()
