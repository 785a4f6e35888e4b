"""Three hosts, one etcd member and one agent on each, sharing the registry.

The agents name all three members; when one member stops, the registry keeps
serving reads and writes through the others and every agent keeps up.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import Peers
from etcdproc import EtcdProcess
from multihost import cut_off_and_back, endpoints, until

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent
from consulate.control.labetcd import lab_cluster

pytestmark = pytest.mark.lab

HOSTS = (1, 2, 3)
LIVENESS_TTL = 3.0  # the agents' --liveness-ttl: a cut-off host's instances leave after it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[labmod.Lab, dict[int, EtcdProcess], dict[int, LabAgent]]]:
    work = tmp_path_factory.mktemp("etcd-cluster")
    with labmod.up(hosts=3, containers=1) as lab, lab_cluster(lab, work, HOSTS) as etcd:
        agents: dict[int, LabAgent] = {}
        try:
            for i in HOSTS:
                agents[i] = LabAgent(lab, i, work / f"agent-h{i}", work / f"agent-h{i}.log",
                                     extra_args=["--registry", etcd.registry, "--liveness-ttl",
                                                 f"{LIVENESS_TTL}s"]).start()
            yield lab, etcd.members, agents
        finally:
            for agent in agents.values():
                agent.stop()


def _ids(agent: LabAgent, service: str) -> list[str]:
    return [e["ServiceID"] for e in agent.api("GET", f"/v1/catalog/service/{service}")]


def test_a_registration_on_one_host_is_seen_by_every_agent(
    cluster: tuple[labmod.Lab, dict[int, EtcdProcess], dict[int, LabAgent]],
) -> None:
    lab, _, agents = cluster
    agents[1].register("web", "web-1", lab.container_ip(1, 1), 80)
    for i in HOSTS:
        until(lambda i=i: _ids(agents[i], "web") == ["web-1"])  # type: ignore[misc]
    # Each agent's route table follows: the service has a VIP everywhere.
    for i in HOSTS:
        until(lambda i=i: "web" in agents[i].api(  # type: ignore[misc]
            "GET", "/v1/agent/self")["Stats"]["routes"]["services"])
    agents[3].api("PUT", "/v1/agent/service/deregister/web-1")
    for i in HOSTS:
        until(lambda i=i: _ids(agents[i], "web") == [])  # type: ignore[misc]


def test_one_member_down_the_registry_keeps_serving(
    cluster: tuple[labmod.Lab, dict[int, EtcdProcess], dict[int, LabAgent]],
) -> None:
    lab, members, agents = cluster
    members[1].stop()  # the member every agent dialled first
    try:
        agents[2].register("api", "api-1", lab.container_ip(2, 1), 8080)
        for i in HOSTS:
            until(lambda i=i: _ids(agents[i], "api") == ["api-1"], 20)  # type: ignore[misc]
        agents[1].api("PUT", "/v1/kv/config/mode", "active")
        assert agents[3].api("GET", "/v1/kv/config/mode?raw") == "active"
    finally:
        members[1].start()


def test_a_container_reaches_instances_on_other_hosts_by_name(
    cluster: tuple[labmod.Lab, dict[int, EtcdProcess], dict[int, LabAgent]],
) -> None:
    lab, _, agents = cluster
    peers = Peers(lab)
    try:
        for i in (2, 3):  # the instances run on h2 and h3, each registered by its agent
            peers.serve(f"h{i}c1", f"echo-h{i}", 7000)
            agents[i].register("echo", f"echo-h{i}", lab.container_ip(i, 1), 7000)
        until(lambda: endpoints(agents[1], "echo") == 2)
        results = peers.connect("h1c1", "echo.service.consul", 7000, count=4, size=10_000)
        assert [r["ok"] for r in results] == [True] * 4
        assert {r["id"] for r in results} == {"echo-h2", "echo-h3"}  # both hosts serve
    finally:
        peers.stop_all()


def test_a_host_cut_off_leaves_the_routes_within_the_ttl_and_comes_back(
    cluster: tuple[labmod.Lab, dict[int, EtcdProcess], dict[int, LabAgent]],
) -> None:
    lab, _, agents = cluster
    dropped_after = cut_off_and_back(lab, agents, "cut", LIVENESS_TTL)
    print(f"h3's instance left h1's routes {dropped_after:.2f}s after the cut "
          f"(TTL {LIVENESS_TTL:g}s)")
    assert "event=re-register id=cut-h3" in agents[3].log()
