"""Limits end to end: a real agent in a lab host, once with each relay.

The agent runs with --max-connections 4, --max-pending-per-service 2 and
--dns-rate-limit 0.5. A container's connections go through the real iptables
REDIRECT to the proxy and on to a real echo server (tests/netsvc.py). The test
drives the client sockets itself: they are made inside the container's network
namespace (a socket stays in the namespace it was made in) by a helper process
there, and handed over on a unix socket (SCM_RIGHTS).

Descriptor exhaustion: the running agent's RLIMIT_NOFILE is lowered
(prlimit(2)) to what it has open plus four, so two proxied connections fit and
the third accept(2) fails with EMFILE.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Peers
from dnslib import QTYPE, RCODE, DNSRecord

from consulate.control.lab import Lab
from consulate.control.labagent import LabAgent

pytestmark = pytest.mark.lab

AGENT_EXTRA_ARGS = ["--max-connections", "4", "--max-pending-per-service", "2",
                    "--dns-rate-limit", "0.5", "--connect-timeout", "3"]
WAIT = 20.0  # seconds any condition may take on a busy machine
LINGER_RESET = struct.pack("ii", 1, 0)


def sockets_in(lab: Lab, where: str, count: int,
               kind: socket.SocketKind = socket.SOCK_STREAM) -> list[socket.socket]:
    """``count`` fresh sockets made inside the namespace of ``where``."""
    ours, theirs = socket.socketpair()
    script = ("import socket,sys\n"
              "c=socket.socket(fileno=int(sys.argv[1]))\n"
              "s=[socket.socket(type=int(sys.argv[3])) for _ in range(int(sys.argv[2]))]\n"
              "socket.send_fds(c,[b'ok'],[x.fileno() for x in s])\n")
    try:
        done = lab.exec(where, [sys.executable, "-c", script, str(theirs.fileno()), str(count),
                                str(int(kind))], pass_fds=[theirs.fileno()], timeout=30,
                        capture_output=True)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        _, fds, _, _ = socket.recv_fds(ours, 16, count)
    finally:
        ours.close()
        theirs.close()
    made = [socket.socket(fileno=fd) for fd in fds]
    for sock in made:
        sock.settimeout(WAIT)
    return made


def until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def greeted(sock: socket.socket, address: tuple[str, int], ident: str) -> None:
    """Connect through the proxy and get the echo server's greeting."""
    sock.connect(address)
    assert recv_exactly(sock, len(ident) + 1) == f"{ident}\n".encode()


def refused(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect: the proxy accepts (the kernel does), then resets (the reset may come
    before connect(2) has returned)."""
    with pytest.raises(ConnectionResetError):
        sock.connect(address)
        sock.recv(100)


def echoes(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def proxy_stats(agent: LabAgent) -> dict[str, Any]:
    stats: dict[str, Any] = agent.api("GET", "/v1/agent/self")["Stats"]["proxy"]
    return stats


def active(agent: LabAgent, service: str) -> int:
    counters = proxy_stats(agent)["services"].get(service, {})
    return int(counters.get("connections_active", 0))


def log_lines(agent: LabAgent, pattern: str) -> list[str]:
    return [line for line in agent.log().splitlines() if re.search(pattern, line)]


def metric(agent: LabAgent, name: str) -> float:
    text = agent.lab.exec(agent.where, ["curl", "-s", "http://127.0.0.1:8500/metrics"],
                          capture_output=True, text=True, timeout=15).stdout
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


@pytest.fixture(scope="module")
def web(mesh_lab: Lab, agent: LabAgent, peers: Peers) -> tuple[str, int]:
    peers.serve("h1c1", "web-1", 8080)
    agent.register("web", "web-1", mesh_lab.container_ip(1, 1), 8080)
    vip = until(lambda: agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]
                .get("web", {}).get("vip"), "web has a VIP")
    return str(vip), 80


@pytest.fixture
def clean(agent: LabAgent) -> Iterator[None]:
    """Each test starts and ends with no connection relayed."""
    yield
    until(lambda: all(c["connections_active"] == 0
                      for c in proxy_stats(agent)["services"].values()),
          "every connection closed")


def test_max_connections_refuses_new_ones_and_keeps_the_others(
        mesh_lab: Lab, agent: LabAgent, web: tuple[str, int], clean: None) -> None:
    held = sockets_in(mesh_lab, "h1c4", 4)
    extra = sockets_in(mesh_lab, "h1c4", 3)
    try:
        for sock in held:
            greeted(sock, web, "web-1")
        refused(extra[0], web)
        refused(extra[1], web)
        for i, sock in enumerate(held):  # the relayed ones are untouched
            echoes(sock, f"still here {i}".encode() * 1000)
        assert proxy_stats(agent)["overflow"] == 2
        assert metric(agent, "consulate_downstream_cx_overflow_total") == 2
        held[0].close()
        until(lambda: active(agent, "web") == 3, "the closed connection is over")
        greeted(extra[2], web, "web-1")  # room again
        echoes(extra[2], b"welcome")
    finally:
        close_all(held + extra)
    # One line when the episode starts, one when it ends: not one per refusal.
    reached = until(lambda: log_lines(agent, r"event=limit-reached limit=max_connections"),
                    "the limit-reached line")
    assert [line.split("event=", 1)[1] for line in reached] == [
        "limit-reached limit=max_connections value=4 action=refuse"]
    cleared = until(lambda: log_lines(agent, r"event=limit-cleared limit=max_connections"),
                    "the limit-cleared line")
    assert len(cleared) == 1
    assert re.search(r"event=limit-cleared limit=max_connections value=4 refused=2 "
                     r"seconds=\d+\.\d{3}$", cleared[0]), cleared[0]


def test_max_pending_per_service_refuses_only_that_service(
        mesh_lab: Lab, agent: LabAgent, web: tuple[str, int], clean: None) -> None:
    # Nothing answers at .200 of the bridge (no ARP reply): a connect there stays
    # pending until --connect-timeout (3 s).
    agent.register("stall", "stall-1", "10.100.1.200", 9)
    stall = until(lambda: agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]
                  .get("stall", {}).get("vip"), "stall has a VIP")
    address = (str(stall), 9)
    pending = sockets_in(mesh_lab, "h1c4", 4)
    other = sockets_in(mesh_lab, "h1c4", 1)[0]
    try:
        pending[0].connect(address)
        pending[1].connect(address)
        until(lambda: proxy_stats(agent)["services"]["stall"]["pending_active"] == 2,
              "two connects pending")
        refused(pending[2], address)
        greeted(other, web, "web-1")  # another service is not limited by this one
        counters = proxy_stats(agent)["services"]["stall"]
        assert (counters["pending_active"], counters["pending_overflow"]) == (2, 1)
        for sock in pending[:2]:  # then their connect times out: reset too
            with pytest.raises(ConnectionResetError):
                sock.recv(100)
        until(lambda: proxy_stats(agent)["services"]["stall"]["pending_active"] == 0,
              "no connect pending")
        pending[3].connect(address)  # admitted (and times out): the episode is over
        until(lambda: log_lines(agent, r"event=limit-cleared limit=max_pending"),
              "the limit-cleared line")
        with pytest.raises(ConnectionResetError):
            pending[3].recv(100)
    finally:
        close_all([*pending, other])
    lines = until(lambda: log_lines(agent, r"event=limit-cleared limit=max_pending"),
                  "the limit-cleared line")
    assert [line.split("event=", 1)[1] for line in
            log_lines(agent, r"event=limit-reached limit=max_pending")] == [
        "limit-reached limit=max_pending_per_service value=2 service=stall action=refuse"]
    assert re.search(r"limit=max_pending_per_service value=2 service=stall refused=1 ",
                     lines[0]), lines
    counters = proxy_stats(agent)["services"]["stall"]
    assert (counters["pending_overflow"], counters["rejected"]) == (1, 3)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _dig(lab: Lab, *args: str) -> str:
    done = lab.exec("h1", ["dig", "@127.0.0.1", "-p", "8600", "+tries=1", "+time=5",
                           *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return str(done.stdout).strip()


def test_descriptor_exhaustion_does_not_crash_and_recovers(
        mesh_lab: Lab, agent: LabAgent, web: tuple[str, int], clean: None) -> None:
    assert agent.process is not None
    pid = agent.process.pid
    held = sockets_in(mesh_lab, "h1c4", 2)
    waiting = sockets_in(mesh_lab, "h1c4", 3)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        # Room for exactly two proxied connections: a client and an upstream socket each.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (_open_fds(pid) + 4, hard))
        for sock in held:
            greeted(sock, web, "web-1")
        for sock in waiting:  # the kernel completes the handshake; accept(2) fails
            sock.connect(web)
        time.sleep(0.5)  # let the agent meet EMFILE (several accept attempts)
        for i, sock in enumerate(held):
            echoes(sock, f"relayed while out of descriptors {i}".encode() * 500)
        # UDP DNS needs no new descriptor: it keeps answering.
        assert _dig(mesh_lab, "+short", "web.service.consul") == web[0]
        assert agent.process.poll() is None
        close_all(held + waiting)  # descriptors come free (once the relays wind down)
        until(lambda: _greeted_once(mesh_lab, web), "a connection relayed again")
    finally:
        close_all(held + waiting)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert agent.api("GET", "/v1/agent/self")["Stats"]["agent"]["ready"] is True
    assert agent.process.poll() is None
    assert "Traceback" not in agent.log()
    if "--relay native" in " ".join(agent.extra_args):
        # The engine paused accepting, said so once, and said when it resumed.
        failed = log_lines(agent, r"event=accept-failed")
        assert [line.split("event=", 1)[1] for line in failed] == [
            "accept-failed error='Too many open files' action=pause-accept"]
        # It resumes for good once accepts work a second after the last failure.
        until(lambda: _greeted_once(mesh_lab, web) and
              log_lines(agent, r"event=accept-resumed failures=\d+$"),
              "the accept-resumed line")


def _greeted_once(lab: Lab, address: tuple[str, int]) -> bool:
    """One connection through the proxy: True when it was relayed (greeting and
    echo). While out of descriptors the Python relay's loop (libuv) accepts and
    closes at once: the client reads EOF, or a reset."""
    [sock] = sockets_in(lab, "h1c4", 1)
    with sock:
        try:
            sock.connect(address)
            if recv_exactly(sock, 6) != b"web-1\n":
                time.sleep(0.2)
                return False
            echoes(sock, b"relayed")
        except ConnectionResetError:
            time.sleep(0.2)
            return False
    return True


def test_no_socket_for_the_upstream_is_not_the_endpoints_failure(
        mesh_lab: Lab, agent: LabAgent, peers: Peers, clean: None) -> None:
    """One descriptor short of a connection: each accepted client's upstream socket
    fails with EMFILE. Outlier detection would eject an endpoint of the two at its
    fifth failure if it blamed the endpoint; it must not."""
    for j in (2, 3):
        peers.serve(f"h1c{j}", f"duo-{j}", 7070)
        agent.register("duo", f"duo-{j}", mesh_lab.container_ip(1, j), 7070)
    vip = until(lambda: agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]
                .get("duo", {}).get("vip"), "duo has a VIP")
    duo = (str(vip), 70)
    assert agent.process is not None
    pid = agent.process.pid
    held = sockets_in(mesh_lab, "h1c4", 1)[0]
    tries = sockets_in(mesh_lab, "h1c4", 12)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        held.connect(duo)
        assert recv_exactly(held, 6) in (b"duo-2\n", b"duo-3\n")
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (_open_fds(pid) + 1, hard))
        for sock in tries:
            with pytest.raises(ConnectionResetError):
                sock.connect(duo)
                sock.recv(100)
        echoes(held, b"unharmed")
    finally:
        close_all([held, *tries])
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    counters = proxy_stats(agent)["services"]["duo"]
    # Both endpoints tried for each (no socket either time), none ejected.
    assert (counters["connect_failures"], counters["ejections"]) == (24, 0)
    assert "event=eject " not in agent.log()


def test_dns_rate_limit_drops_and_slips_per_client(
        mesh_lab: Lab, agent: LabAgent, web: tuple[str, int]) -> None:
    server = (mesh_lab.bridge_ip(1), 53)
    [client] = sockets_in(mesh_lab, "h1c4", 1, socket.SOCK_DGRAM)
    try:
        for query_id in range(1, 11):  # back to back: a burst of 1, then 0.5 per second
            query = DNSRecord.question("web.service.consul", "A")
            query.header.id = query_id
            client.sendto(query.pack(), server)
        replies: dict[int, DNSRecord] = {}
        client.settimeout(2.0)
        try:
            while True:
                reply = DNSRecord.parse(client.recv(4096))
                replies[reply.header.id] = reply
        except TimeoutError:
            pass
    finally:
        client.close()
    answered = replies.pop(1)
    assert (answered.header.rcode, answered.header.tc) == (RCODE.NOERROR, 0)
    assert [(str(rr.rname), rr.rtype, str(rr.rdata)) for rr in answered.rr] == [
        ("web.service.consul.", QTYPE.A, web[0])]
    # Over the limit: the first, third... limited queries get an empty TC=1 reply
    # (come back over TCP), the others nothing.
    assert sorted(replies) == [2, 4, 6, 8, 10]
    for reply in replies.values():
        assert (reply.header.rcode, reply.header.tc, reply.rr) == (RCODE.NOERROR, 1, [])
    # TCP is never limited: the client asks again there, with a real dig.
    done = mesh_lab.exec("h1c4", ["dig", f"@{server[0]}", "+tcp", "+short", "+time=5",
                                  "web.service.consul"], capture_output=True, text=True,
                         timeout=30)
    assert done.stdout.strip() == web[0], done.stdout + done.stderr
    assert metric(agent, "consulate_dns_rate_limited_total") == 9
    client_ip = mesh_lab.container_ip(1, 4)
    assert [line.split("event=", 1)[1] for line in
            log_lines(agent, r"event=limit-reached limit=dns_rate_limit")] == [
        f"limit-reached limit=dns_rate_limit value=0.5 client={client_ip} action=drop"]
