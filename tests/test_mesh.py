"""End to end in a lab: a container reaches services by name through the agent.

Host h1 runs a real ``consulate agent`` (BPF sk_lookup, proxy, DNS on the
container bridge). Containers c1-c3 run echo servers, c4 is the client, c5 a
server that never reads. Every payload is checked byte for byte and by SHA-256,
and the server's trailer, sent after the client's EOF, proves the half-close.
"""

from __future__ import annotations

import itertools
import time

import pytest
from conftest import Peers

from consulate.control.lab import Lab
from consulate.control.labagent import LabAgent

pytestmark = pytest.mark.lab

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def web(mesh_lab: Lab, agent: LabAgent, peers: Peers) -> str:
    for j in (1, 2):
        peers.serve(f"h1c{j}", f"web-{j}", 8080)
        agent.register("web", f"web-{j}", mesh_lab.container_ip(1, j), 8080)
    return "web.service.consul"


def test_consecutive_connections_alternate_endpoints(web: str, peers: Peers) -> None:
    results = peers.connect("h1c4", web, 80, count=6)
    assert [r["ok"] for r in results] == [True] * 6
    ids = [r["id"] for r in results]
    assert set(ids) == {"web-1", "web-2"}
    assert all(a != b for a, b in itertools.pairwise(ids)), ids


@pytest.mark.parametrize("size", [1, 64 * 1024, 50 * MiB])
def test_payload_arrives_intact_both_ways(web: str, peers: Peers, size: int) -> None:
    results = peers.connect("h1c4", web, 80, count=2, size=size)
    for result in results:
        assert result["echo_ok"], result
        assert result["trailer_ok"], result  # sent by the server after our EOF
        assert result["received"] == len(result["id"]) + 1 + size + len("sha256=") + 64 + 1


def test_half_close_client_still_receives_whole_answer(web: str, peers: Peers) -> None:
    [result] = peers.connect("h1c4", web, 80, size=300 * 1024)
    assert result["ok"] and result["trailer_ok"], result


def test_one_endpoint_of_three_down_all_connections_succeed(
    mesh_lab: Lab, agent: LabAgent, peers: Peers
) -> None:
    peers.serve("h1c1", "api-1", 9090)
    peers.serve("h1c2", "api-2", 9090)
    for j in (1, 2, 3):  # nothing listens on c3:9090
        agent.register("api", f"api-{j}", mesh_lab.container_ip(1, j), 9090)
    results = peers.connect("h1c4", "api.service.consul", 9090, count=100, size=1024)
    assert sum(r["ok"] for r in results) == 100
    assert {r["id"] for r in results} == {"api-1", "api-2"}
    counters = agent.api("GET", "/v1/agent/self")["Stats"]["proxy"]["services"]["api"]
    # Every third first pick was retried until the fifth failure ejected api-3 for
    # 30 s (outlier detection): no attempt on it after that.
    assert (counters["connect_failures"], counters["ejections"]) == (5, 1)
    assert counters["rejected"] == 0


def test_udp_tagged_instances_get_no_tcp_connections(
    mesh_lab: Lab, agent: LabAgent, peers: Peers
) -> None:
    """registrator registers a UDP port as its own instance, tagged udp: the TCP proxy
    leaves it to the UDP path (nothing of TCP listens there)."""
    peers.serve("h1c1", "dns-1", 5353)
    agent.register("dns", "dns-1", mesh_lab.container_ip(1, 1), 5353)
    agent.api("PUT", "/v1/agent/service/register", {
        "ID": "dns-1-udp", "Name": "dns", "Address": mesh_lab.container_ip(1, 2),
        "Port": 5353, "Tags": ["udp"]})
    results = peers.connect("h1c4", "dns.service.consul", 5353, count=6, size=100)
    assert [(r["ok"], r["id"]) for r in results] == [(True, "dns-1")] * 6
    counters = agent.api("GET", "/v1/agent/self")["Stats"]["proxy"]["services"]["dns"]
    assert (counters["connect_failures"], counters["rejected"]) == (0, 0)


def test_vip_without_endpoints_is_closed_at_once_with_a_reason(
    mesh_lab: Lab, agent: LabAgent, peers: Peers
) -> None:
    agent.register("gone", "gone-1", mesh_lab.container_ip(1, 1), 7070)
    agent.api("PUT", "/v1/agent/service/deregister/gone-1")
    # DNS answers NXDOMAIN now; a client that resolved the name earlier still has the VIP.
    vip = agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]["gone"]["vip"]
    [result] = peers.connect("h1c4", vip, 80)
    assert not result["ok"], result
    assert result.get("received", 0) == 0
    # An RST reaches whichever of the client's calls comes first: connect() or
    # recv() see ECONNRESET, or the sender's shutdown() finds the socket closed
    # (ENOTCONN).
    assert "ConnectionResetError" in result["error"] or "(107," in result["error"], result
    assert result["elapsed"] < 1.0  # refused, not left to a timeout
    assert "reason=no-endpoints" in agent.log()
    assert "service=gone" in agent.log()


def test_slow_reader_does_not_make_the_agent_buffer(
    mesh_lab: Lab, agent: LabAgent, peers: Peers
) -> None:
    peers.serve("h1c5", "sink-1", 6060, mode="sink")
    agent.register("sink", "sink-1", mesh_lab.container_ip(1, 5), 6060)
    [flood] = peers.run("h1c4", "flood", "--host", "sink.service.consul", "--port", "6060",
                        "--seconds", "3")
    # Kernel socket buffers along the path hold a few MiB each; an agent that kept
    # reading would have taken in gigabytes in 3 s.
    assert 0 < flood["accepted"] < 48 * MiB, flood


def test_unanswered_connect_times_out_and_retries_elsewhere(
    mesh_lab: Lab, agent: LabAgent, peers: Peers
) -> None:
    peers.serve("h1c2", "slow-2", 5050)
    # c3 drops SYNs to 5050: connecting there hangs until the agent's timeout (1 s).
    mesh_lab.exec("h1c3", ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "5050",
                           "-j", "DROP"], check=True)
    for j in (2, 3):
        agent.register("slow", f"slow-{j}", mesh_lab.container_ip(1, j), 5050)
    results = peers.connect("h1c4", "slow.service.consul", 5050, count=4)
    assert [r["id"] for r in results] == ["slow-2"] * 4
    assert sum(r["elapsed"] >= 0.9 for r in results) == 2  # every other one waited 1 s
    counters = agent.api("GET", "/v1/agent/self")["Stats"]["proxy"]["services"]["slow"]
    assert (counters["connect_failures"], counters["rejected"]) == (2, 0)
    assert "event=connect-failed service=slow endpoint=slow-3" in agent.log()


def test_counters_count_every_byte_and_connection(
    mesh_lab: Lab, agent: LabAgent, peers: Peers
) -> None:
    peers.serve("h1c3", "tally-1", 4040)
    agent.register("tally", "tally-1", mesh_lab.container_ip(1, 3), 4040)
    results = peers.connect("h1c4", "tally.service.consul", 80, count=3, size=100_000)
    assert [r["ok"] for r in results] == [True] * 3
    trailer = len("sha256=") + 64 + 1

    def counters() -> dict[str, int]:
        stats = agent.api("GET", "/v1/agent/self")["Stats"]["proxy"]["services"]["tally"]
        return dict(stats)

    # The client has its answer a moment before the relay has closed both sides.
    deadline = time.monotonic() + 2
    while counters()["connections_active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    final = counters()
    spliced = (final.pop("bytes_spliced_to_upstream"), final.pop("bytes_spliced_to_client"))
    assert final == {
        "connections_total": 3, "connections_active": 0, "connect_failures": 0,
        "rejected": 0, "bytes_to_upstream": 3 * 100_000,
        "bytes_to_client": 3 * (len("tally-1\n") + 100_000 + trailer),
        "ejections": 0, "ejections_active": 0, "pending_active": 0, "pending_overflow": 0,
    }
    # The engine splices what it can of 100 kB streams; the Python relay copies all.
    if agent.api("GET", "/v1/agent/self")["Stats"]["relay"]["engine"] == "python":
        assert spliced == (0, 0)
    else:
        assert 0 < spliced[0] <= final["bytes_to_upstream"]
        assert 0 < spliced[1] <= final["bytes_to_client"]


def test_address_in_the_vip_range_but_no_service_is_reset(
    agent: LabAgent, peers: Peers
) -> None:
    before = agent.api("GET", "/v1/agent/self")["Stats"]["proxy"]["unrouted"]
    [result] = peers.connect("h1c4", "240.0.0.1", 80)  # none of this suite's names maps here
    assert not result["ok"], result
    assert result["elapsed"] < 1.0
    assert "destination=240.0.0.1:80 reason=unknown-vip" in agent.log()
    assert agent.api("GET", "/v1/agent/self")["Stats"]["proxy"]["unrouted"] == before + 1


def test_sk_lookup_mode_leaves_tcp_out_of_the_nat_table(mesh_lab: Lab,
                                                        agent: LabAgent) -> None:
    rules = mesh_lab.exec("h1", ["iptables-save", "-t", "nat"], capture_output=True,
                         text=True, check=True).stdout
    assert "-A CONSULATE-PREROUTING -d 240.0.0.0/4 -p udp -j CONSULATE-UDP" in rules
    assert "-p tcp -j REDIRECT" not in rules
    assert "--mark 0xc0a -j RETURN" not in rules


def test_sk_lookup_mode_rejects_a_connection_made_to_the_proxy_port_itself(
        mesh_lab: Lab, agent: LabAgent, peers: Peers) -> None:
    before = agent.api("GET", "/v1/agent/self")["Stats"]["proxy"]["unrouted"]
    [result] = peers.connect("h1c4", mesh_lab.bridge_ip(1), 10000)
    assert not result["ok"], result
    assert "reason=no-original-destination" in agent.log()
    assert agent.api("GET", "/v1/agent/self")["Stats"]["proxy"]["unrouted"] == before + 1


def test_an_endpoint_inside_the_vip_range_is_refused_not_looped(
        mesh_lab: Lab, agent: LabAgent, peers: Peers) -> None:
    before = agent.api("GET", "/v1/agent/self")["Stats"]["proxy"]
    agent.register("loop", "loop-1", "240.0.0.9", 80)
    [result] = peers.connect("h1c4", "loop.service.consul", 80)
    assert not result["ok"], result
    log = agent.log()
    assert "event=connect-failed service=loop endpoint=loop-1 address=240.0.0.9:80" in log
    assert "service=loop reason=all-attempts-failed attempts=1" in log
    after = agent.api("GET", "/v1/agent/self")["Stats"]["proxy"]
    assert after["unrouted"] == before["unrouted"]  # the proxy never accepted itself
    assert after["services"]["loop"]["connect_failures"] == 1
