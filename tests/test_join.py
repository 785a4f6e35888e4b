"""Three hosts, one registry: embedded in h1's agent, h2's and h3's agents joined to
it (``--join``), over h1's API with a token since it listens off loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from multihost import cut_off_and_back, until

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent

pytestmark = pytest.mark.lab

LIVENESS_TTL = 3.0
TOKEN = "join-test-token"


@pytest.fixture(scope="module")
def joined(tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[labmod.Lab, dict[int, LabAgent]]]:
    work = tmp_path_factory.mktemp("join")
    ttl = ["--liveness-ttl", f"{LIVENESS_TTL}s"]
    with labmod.up(hosts=3, containers=1) as lab:
        agents: dict[int, LabAgent] = {}
        try:
            agents[1] = LabAgent(lab, 1, work / "h1", work / "h1.log", token=TOKEN,
                                 extra_args=["--http-addr", "0.0.0.0:8500", *ttl]).start()
            for i in (2, 3):
                agents[i] = LabAgent(lab, i, work / f"h{i}", work / f"h{i}.log", token=TOKEN,
                                     extra_args=["--join", f"{lab.host_ip(1)}:8500",
                                                 *ttl]).start()
            yield lab, agents
        finally:
            for agent in agents.values():
                agent.stop()


def test_joined_agents_share_h1s_registry(joined: tuple[labmod.Lab, dict[int, LabAgent]],
                                          tmp_path: Path) -> None:
    lab, agents = joined
    agents[3].register("shared", "shared-1", lab.container_ip(3, 1), 80)
    for i in (1, 2, 3):
        until(lambda i=i: [e["ServiceID"] for e in agents[i].api(  # type: ignore[misc]
            "GET", "/v1/catalog/service/shared")] == ["shared-1"])
    assert agents[2].api("GET", "/v1/agent/self")["Stats"]["registry"] == {
        "location": f"http://{lab.host_ip(1)}:8500", "owned_instances": 0}
    agents[2].api("PUT", "/v1/agent/service/deregister/shared-1")
    until(lambda: agents[1].api("GET", "/v1/catalog/service/shared") == [])


def test_a_joined_host_cut_off_leaves_the_routes_and_comes_back(
        joined: tuple[labmod.Lab, dict[int, LabAgent]]) -> None:
    lab, agents = joined
    dropped_after = cut_off_and_back(lab, agents, "joined", LIVENESS_TTL)
    print(f"h3's instance left h1's routes {dropped_after:.2f}s after the cut "
          f"(TTL {LIVENESS_TTL:g}s)")


def test_join_and_registry_together_are_refused(tmp_path: Path) -> None:
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "consulate.control.cli", "agent",
                           "--join", "10.0.0.1:8500", "--registry", "etcd://10.0.0.2:2379",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert (done.returncode, done.stderr.strip()) == (
        1, "consulate: error: --join 10.0.0.1:8500 and --registry etcd://10.0.0.2:2379: "
           "give one of them")
