"""UDP services by name in a lab: a real agent, its NFQUEUE flow router and conntrack.

Host h1 runs ``consulate agent``; containers c1 and c2 run instances of a UDP echo
service (each answers ``<id>\\n`` + the datagram), c3 is the client, c4 runs
dnsmasq as a real UDP protocol behind a VIP. The client keeps one socket per
"flow" open across steps, so a test can move an instance away between two
datagrams of the same flow. Replies are read with ``recvfrom`` to check that they
come from the VIP, byte for byte.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest

from consulate.control import lab as labmod
from consulate.control.labagent import AgentStartError, LabAgent

pytestmark = pytest.mark.lab

ECHO_PORT = 7000

ECHO_SERVER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[1])))
ident = sys.argv[2].encode() + b"\\n"
print("listening", flush=True)
while True:
    data, peer = sock.recvfrom(65535)
    sock.sendto(ident + data, peer)
"""

# Reads {"flow", "payload" (hex), "connect"} lines, prints one JSON result per line.
FLOW_CLIENT = """
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
address = socket.gethostbyname(host)  # through the agent's DNS: the VIP
print(json.dumps({"address": address}), flush=True)
flows = {}
for line in sys.stdin:
    cmd = json.loads(line)
    payload = bytes.fromhex(cmd["payload"])
    sock = flows.get(cmd["flow"])
    if sock is None:
        sock = flows[cmd["flow"]] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(5)
        if cmd["connect"]:
            sock.connect((address, port))
    try:
        if cmd["connect"]:
            sock.send(payload)
            data, source = sock.recv(65535), (address, port)
        else:
            sock.sendto(payload, (address, port))
            data, source = sock.recvfrom(65535)
    except OSError as exc:
        print(json.dumps({"error": type(exc).__name__}), flush=True)
        continue
    ident, _, echoed = data.partition(b"\\n")
    print(json.dumps({"id": ident.decode(), "echo_ok": echoed == payload,
                      "source": list(source), "port": sock.getsockname()[1]}), flush=True)
"""


class FlowClient:
    """A client process in a container holding one UDP socket per named flow."""

    def __init__(self, lab: labmod.Lab, where: str, host: str, port: int) -> None:
        self.proc = lab.popen(where, [sys.executable, "-c", FLOW_CLIENT, host, str(port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.address = self._read()["address"]
        self.port = port

    def _read(self) -> dict[str, Any]:
        stdout: IO[str] | None = self.proc.stdout
        assert stdout is not None
        line = stdout.readline()
        assert line, f"client exited with {self.proc.wait()}"
        result: dict[str, Any] = json.loads(line)
        return result

    def send(self, flow: str, payload: bytes = b"ping", *, connect: bool = False
             ) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"flow": flow, "payload": payload.hex(),
                                          "connect": connect}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def ids(self, flow: str, count: int) -> list[str]:
        results = [self.send(flow, os.urandom(16)) for _ in range(count)]
        for result in results:
            assert result.get("echo_ok"), result
            assert result["source"] == [self.address, self.port]  # from the VIP
        return [r["id"] for r in results]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def udp_lab() -> Iterator[labmod.Lab]:
    with labmod.up(hosts=2, containers=4) as built:  # h2: for an agent that cannot start
        yield built


@pytest.fixture(scope="module")
def udp_agent(udp_lab: labmod.Lab, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[LabAgent]:
    work = tmp_path_factory.mktemp("udp-agent")
    running = LabAgent(udp_lab, 1, work / "data", work / "agent.log",
                       extra_args=["--relay", "python"]).start()
    try:
        yield running
    finally:
        running.stop()


class Servers:
    def __init__(self, lab: labmod.Lab) -> None:
        self.lab = lab
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def echo(self, where: str, ident: str, port: int) -> None:
        proc = self.lab.popen(where, [sys.executable, "-c", ECHO_SERVER, str(port), ident],
                              stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"listening\n", f"echo server {ident} did not start"
        self.procs[ident] = proc

    def start(self, ident: str, argv: list[str], where: str) -> None:
        self.procs[ident] = self.lab.popen(where, argv, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)

    def kill(self, ident: str) -> None:
        proc = self.procs.pop(ident)
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def servers(udp_lab: labmod.Lab) -> Iterator[Servers]:
    started = Servers(udp_lab)
    try:
        yield started
    finally:
        for ident in list(started.procs):
            started.kill(ident)


def register_udp(agent: LabAgent, name: str, ident: str, address: str, port: int,
                 tags: tuple[str, ...] = ("udp",)) -> None:
    agent.api("PUT", "/v1/agent/service/register",
              {"ID": ident, "Name": name, "Address": address, "Port": port, "Tags": list(tags)})


def udp_stats(agent: LabAgent) -> dict[str, Any]:
    stats: dict[str, Any] = agent.api("GET", "/v1/agent/self")["Stats"]["udp"]
    return stats


def wait_udp_endpoints(agent: LabAgent, count: int) -> None:
    """Until the agent's DNAT chain routes exactly ``count`` UDP endpoints."""
    deadline = time.monotonic() + 15
    while udp_stats(agent)["endpoints"] != count:
        assert time.monotonic() < deadline, f"UDP endpoints != {count}:\n{agent.log()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def echo(udp_lab: labmod.Lab, udp_agent: LabAgent, servers: Servers) -> Iterator[FlowClient]:
    """Two echo instances (echo-1 in c1, echo-2 in c2) and a client in c3."""
    for j in (1, 2):
        servers.echo(f"h1c{j}", f"echo-{j}", ECHO_PORT)
        register_udp(udp_agent, "echo", f"echo-{j}", udp_lab.container_ip(1, j), ECHO_PORT)
    wait_udp_endpoints(udp_agent, 2)
    client = FlowClient(udp_lab, "h1c3", "echo.service.consul", ECHO_PORT)
    try:
        yield client
    finally:
        client.close()


def test_by_name_datagrams_are_answered_from_the_vip_byte_for_byte(
    echo: FlowClient, udp_agent: LabAgent
) -> None:
    vip = udp_agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]["echo"]["vip"]
    assert echo.address == vip
    for size in (1, 1400, 8000):  # 8000: fragmented on the 1500-byte links, both ways
        payload = os.urandom(size)
        result = echo.send(f"size-{size}", payload)
        assert result["echo_ok"] and result["source"] == [vip, ECHO_PORT], result
        assert result["id"] in {"echo-1", "echo-2"}


def test_a_flow_sticks_to_one_instance(echo: FlowClient) -> None:
    ids = echo.ids("sticky", 20)
    assert ids == [ids[0]] * 20


def test_new_flows_alternate_between_instances(echo: FlowClient, udp_agent: LabAgent) -> None:
    before = udp_stats(udp_agent)["flows"].get("echo", 0)
    firsts = [echo.ids(f"new-{k}", 2) for k in range(6)]
    assert all(a == b for a, b in firsts)  # each flow keeps its instance
    ids = [a for a, _ in firsts]
    assert set(ids) == {"echo-1", "echo-2"}
    assert all(a != b for a, b in itertools.pairwise(ids)), ids
    assert udp_stats(udp_agent)["flows"]["echo"] == before + 6  # one decision per flow


def test_an_instance_going_away_moves_its_flows_on_the_next_datagram(
    udp_lab: labmod.Lab, udp_agent: LabAgent, servers: Servers
) -> None:
    for j in (1, 2):
        servers.echo(f"h1c{j}", f"move-{j}", 7100)
        register_udp(udp_agent, "move", f"move-{j}", udp_lab.container_ip(1, j), 7100)
    wait_udp_endpoints(udp_agent, 4)
    client = FlowClient(udp_lab, "h1c3", "move.service.consul", 7100)
    try:
        placed = {flow: client.ids(flow, 2) for flow in ("a", "b", "c", "d")}
        assert sorted(ids[0] for ids in placed.values()) == ["move-1", "move-1", "move-2",
                                                              "move-2"], placed
        moved_before = udp_stats(udp_agent)["flows_moved"]
        servers.kill("move-1")
        udp_agent.api("PUT", "/v1/agent/service/deregister/move-1")
        wait_udp_endpoints(udp_agent, 3)
        for flow in placed:  # those on move-1 too: the very next datagram is answered
            assert client.ids(flow, 2) == ["move-2", "move-2"], flow
        assert client.ids("fresh", 1) == ["move-2"]
        assert udp_stats(udp_agent)["flows_moved"] == moved_before + 2
        assert "event=udp-flows-moved address=10.100.1.11:7100 flows=2" in udp_agent.log()
    finally:
        client.close()
        servers.kill("move-2")
        udp_agent.api("PUT", "/v1/agent/service/deregister/move-2")
        wait_udp_endpoints(udp_agent, 2)


def test_an_idle_flow_is_balanced_again_after_the_conntrack_timeout(
    udp_lab: labmod.Lab, echo: FlowClient
) -> None:
    sysctls = ("net.netfilter.nf_conntrack_udp_timeout",
               "net.netfilter.nf_conntrack_udp_timeout_stream")
    saved = [udp_lab.exec("h1", ["sysctl", "-n", s], capture_output=True, text=True,
                          check=True).stdout.strip() for s in sysctls]
    for name in sysctls:
        udp_lab.exec("h1", ["sysctl", "-qw", f"{name}=2"], check=True)
    try:
        [first] = echo.ids("idle", 1)
        assert echo.ids("idle", 3) == [first] * 3  # within the timeout: same instance
        time.sleep(4)  # idle past the (2 s) timeout: the kernel forgets the flow
        [again] = echo.ids("idle", 1)
        assert again != first  # a new decision, and round robin moved on
    finally:
        for name, value in zip(sysctls, saved, strict=True):
            udp_lab.exec("h1", ["sysctl", "-qw", f"{name}={value}"], check=True)


def test_a_vip_without_udp_endpoints_refuses_at_once_then_recovers(
    udp_lab: labmod.Lab, udp_agent: LabAgent, servers: Servers
) -> None:
    # Only a TCP instance: datagrams to the VIP have nowhere to go.
    register_udp(udp_agent, "late", "late-tcp", udp_lab.container_ip(1, 1), 7200, tags=())
    client = FlowClient(udp_lab, "h1c3", "late.service.consul", 7200)
    try:
        started = time.monotonic()
        assert client.send("flow", connect=True) == {"error": "ConnectionRefusedError"}
        assert time.monotonic() - started < 2  # port unreachable, not a timeout
        assert udp_stats(udp_agent)["refused"]["late"] == 1
        assert "event=udp-reject client=10.100.1.13:" in udp_agent.log()
        assert f"service=late vip={client.address}:7200 reason=no-endpoints" in udp_agent.log()
        servers.echo("h1c1", "late-1", 7200)
        register_udp(udp_agent, "late", "late-1", udp_lab.container_ip(1, 1), 7200)
        wait_udp_endpoints(udp_agent, 3)
        deadline = time.monotonic() + 10  # the refused flow was forgotten with the sync
        while (result := client.send("flow", b"again", connect=True)).get("id") != "late-1":
            assert time.monotonic() < deadline, result
            time.sleep(0.1)
        assert result["echo_ok"]
    finally:
        client.close()
        servers.kill("late-1")
        for ident in ("late-1", "late-tcp"):
            udp_agent.api("PUT", f"/v1/agent/service/deregister/{ident}")
        wait_udp_endpoints(udp_agent, 2)


def test_an_address_in_the_vip_range_without_a_service_is_refused(
    udp_lab: labmod.Lab, udp_agent: LabAgent
) -> None:
    before = udp_stats(udp_agent)["unrouted"]
    client = FlowClient(udp_lab, "h1c3", "240.0.0.1", 9)
    try:
        assert client.send("flow", connect=True) == {"error": "ConnectionRefusedError"}
    finally:
        client.close()
    assert udp_stats(udp_agent)["unrouted"] == before + 1
    assert "destination=240.0.0.1:9 reason=unknown-vip" in udp_agent.log()


@pytest.fixture(scope="module")
def nameserver(udp_lab: labmod.Lab, udp_agent: LabAgent, servers: Servers,
               echo: FlowClient) -> str:
    """dnsmasq in c4 registered as the UDP service ``ns`` (53/udp); its VIP."""
    address = udp_lab.container_ip(1, 4)
    servers.start("dnsmasq", ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
                              "--no-resolv", "--no-hosts", "--bind-interfaces",
                              f"--listen-address={address}", "--port=53", "--pid-file",
                              "--host-record=app.example.test,192.0.2.7"], "h1c4")
    register_udp(udp_agent, "ns", "h1:dnsmasq:53:udp", address, 53)
    wait_udp_endpoints(udp_agent, 3)
    vip: str = udp_agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]["ns"]["vip"]
    return vip


def _dig(udp_lab: labmod.Lab, where: str, server: str) -> list[str]:
    deadline = time.monotonic() + 10  # until dnsmasq has bound its socket
    while True:
        done = udp_lab.exec(where, ["dig", f"@{server}", "app.example.test", "A", "+noall",
                                    "+answer", "+stats", "+time=2", "+tries=1"],
                            capture_output=True, text=True, timeout=30)
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def test_dig_by_name_through_the_vip_reaches_dnsmasq(udp_lab: labmod.Lab,
                                                      nameserver: str) -> None:
    lines = _dig(udp_lab, "h1c3", "ns.service.consul")  # resolved by the agent: the VIP
    assert lines[0].split() == ["app.example.test.", "0", "IN", "A", "192.0.2.7"]
    assert f";; SERVER: {nameserver}#53(ns.service.consul) (UDP)" in lines


def test_dig_from_a_host_process_to_the_vip(udp_lab: labmod.Lab, nameserver: str) -> None:
    lines = _dig(udp_lab, "h1", nameserver)  # nat OUTPUT: the agent's own host
    assert lines[0].split() == ["app.example.test.", "0", "IN", "A", "192.0.2.7"]
    assert f";; SERVER: {nameserver}#53({nameserver}) (UDP)" in lines


def test_an_agent_whose_queue_is_taken_says_so_and_leaves_no_rules(
    udp_lab: labmod.Lab, tmp_path: Any
) -> None:
    holder = udp_lab.popen("h2", [sys.executable, "-c", (
        "from netfilterqueue import NetfilterQueue\n"
        "q = NetfilterQueue(); q.bind(10000, lambda p: p.accept()); print('bound', flush=True)\n"
        "import time; time.sleep(600)\n")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"bound\n"
        agent = LabAgent(udp_lab, 2, tmp_path / "data", tmp_path / "agent.log")
        with pytest.raises(AgentStartError, match="exited with 1") as failed:
            agent.start()
        agent.stop()
        assert ("consulate: error: cannot bind NFQUEUE 10000 (Failed to create queue 10000.):"
                " another agent may run in this network namespace, or this one lacks"
                " CAP_NET_ADMIN (run it as root)\n") in str(failed.value)
        rules = udp_lab.exec("h2", ["iptables-save", "-t", "nat"], capture_output=True,
                             text=True, check=True).stdout
        assert "CONSULATE" not in rules
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
