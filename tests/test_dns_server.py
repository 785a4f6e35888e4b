"""The DNS server on real loopback sockets: UDP and TCP, truncation, recursors, garbage.

Upstream resolvers are fakes on 127.0.0.x run by the test itself (dnslib-built
replies): nothing is ever sent off the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSRecord

from consulate.control.agent import apply_change
from consulate.control.registry import EmbeddedRegistry, Instance
from consulate.dns import server as dns_server
from consulate.dns.answer import Responder
from consulate.dns.config import DnsConfig
from consulate.dns.server import DnsServer
from consulate.native import Capabilities
from consulate.proxy.table import Endpoint, RouteTable
from consulate.proxy.vip import VipAllocator

HOST = "127.0.0.1"


def free_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host``."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port


class _Datagram(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.replies.put_nowait(data)


async def udp_exchange(address: tuple[str, int], packet: bytes,
                       timeout: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Datagram, remote_addr=address)
    try:
        transport.sendto(packet)
        async with asyncio.timeout(timeout):
            return await protocol.replies.get()
    finally:
        transport.close()


async def tcp_exchange(address: tuple[str, int], *packets: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(b"".join(len(p).to_bytes(2, "big") + p for p in packets))
        replies = []
        for _ in packets:
            size = int.from_bytes(await reader.readexactly(2), "big")
            replies.append(await reader.readexactly(size))
        return replies
    finally:
        writer.close()


def question(name: str, qtype: str = "A", edns: int | None = None) -> DNSRecord:
    query = DNSRecord.question(name, qtype)
    if edns is not None:
        query.add_ar(EDNS0(udp_len=edns))
    return query


@dataclass
class FakeUpstream:
    """A resolver on 127.0.0.x: answers every A query with ``answers`` records, or
    stays silent; remembers each name it was asked."""

    host: str
    answers: int = 1
    silent: bool = False
    seen: list[str] = field(default_factory=list)
    port: int = 0
    _closers: list[Any] = field(default_factory=list)

    def reply(self, packet: bytes) -> bytes | None:
        query = DNSRecord.parse(packet)
        self.seen.append(str(query.q.qname))
        if self.silent:
            return None
        reply = query.reply()
        for i in range(self.answers):
            reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=60, rdata=A(f"192.0.2.{i % 250}")))
        return bytes(reply.pack())

    async def start(self) -> FakeUpstream:
        self.port = free_port(self.host)
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = upstream.reply(data)
                if reply is not None:
                    self.transport.sendto(reply, addr)  # type: ignore[attr-defined]

        async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            size = int.from_bytes(await reader.readexactly(2), "big")
            reply = self.reply(await reader.readexactly(size))
            if reply is not None:
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
            writer.close()

        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host,
                                                                            self.port))
        server = await asyncio.start_server(stream, self.host, self.port)
        self._closers += [transport, server]
        return self

    def close(self) -> None:
        for closer in self._closers:
            closer.close()


def make_table() -> RouteTable:
    table = RouteTable(VipAllocator("240.0.0.0/4"))
    table.replace_all([
        Endpoint("web", "web-1", "10.0.0.1", 80),
        *(Endpoint("big", f"big-{i}", f"10.1.{i // 250}.{i % 250 + 1}", 9000, weight=i % 5 + 1)
          for i in range(200)),
    ])
    return table


async def serve(config: DnsConfig) -> tuple[DnsServer, tuple[str, int]]:
    server = DnsServer(Responder(make_table(), config, rng=random.Random(1)), config)
    port = free_port(HOST)
    await server.listen(HOST, port)
    return server, (HOST, port)


@pytest.fixture(autouse=True, params=["batched", "datagram"])
def udp_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on both UDP paths: recvmmsg/sendmmsg batches (the native
    module) and the one-datagram-per-callback protocol (without it)."""
    if request.param == "datagram":
        monkeypatch.setattr(dns_server.native, "capabilities",
                            lambda: Capabilities(extension=False, splice=False))
    return str(request.param)


async def test_the_udp_path_is_the_one_asked_for(udp_path: str) -> None:
    server, address = await serve(DnsConfig())
    try:
        assert server.batched == (udp_path == "batched")
        reply = DNSRecord.parse(await udp_exchange(address, bytes(question(
            "web.service.consul").pack())))
        assert reply.header.rcode == RCODE.NOERROR and reply.rr
    finally:
        server.close()


@pytest.fixture
async def plain() -> AsyncIterator[tuple[str, int]]:
    server, address = await serve(DnsConfig())
    yield address
    server.close()


async def test_udp_and_tcp_give_the_same_answer(plain: tuple[str, int]) -> None:
    query = question("web.service.consul")
    over_udp = DNSRecord.parse(await udp_exchange(plain, bytes(query.pack())))
    [raw] = await tcp_exchange(plain, bytes(query.pack()))
    over_tcp = DNSRecord.parse(raw)
    assert over_udp.header.id == over_tcp.header.id == query.header.id
    assert [str(rr.rdata) for rr in over_udp.rr] == [str(rr.rdata) for rr in over_tcp.rr]
    assert over_udp.header.rcode == RCODE.NOERROR and len(over_udp.rr) == 1


async def test_truncated_over_udp_then_whole_over_tcp(plain: tuple[str, int]) -> None:
    query = question("big.service.consul", "SRV", edns=1232)
    raw = await udp_exchange(plain, bytes(query.pack()))
    cut = DNSRecord.parse(raw)
    assert cut.header.tc == 1 and len(raw) <= 1232 and 0 < len(cut.rr) < 200
    [raw] = await tcp_exchange(plain, bytes(query.pack()))
    whole = DNSRecord.parse(raw)
    assert whole.header.tc == 0 and len(whole.rr) == 200
    assert len({str(rr.rdata.target) for rr in whole.rr}) == 200
    assert len([rr for rr in whole.ar if rr.rtype == QTYPE.A]) == 200


async def test_tcp_answers_pipelined_queries_in_order(plain: tuple[str, int]) -> None:
    queries = [question(name) for name in ("web.service.consul", "nope.service.consul",
                                           "example.com")]
    replies = [DNSRecord.parse(r) for r in await tcp_exchange(
        plain, *(bytes(q.pack()) for q in queries))]
    assert [(r.header.id, r.header.rcode) for r in replies] == [
        (queries[0].header.id, RCODE.NOERROR), (queries[1].header.id, RCODE.NXDOMAIN),
        (queries[2].header.id, RCODE.REFUSED)]


async def test_garbage_does_not_stop_the_server(plain: tuple[str, int]) -> None:
    rng = random.Random(5)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    valid = bytes(question("web.service.consul").pack())
    for _ in range(500):
        sock.sendto(rng.randbytes(rng.randint(0, 100)), plain)
        mutated = bytearray(valid)
        mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        sock.sendto(bytes(mutated), plain)
    sock.close()
    _, writer = await asyncio.open_connection(*plain)
    writer.write(b"\x00\x05abcde\xff\xff")  # a junk message, then a length never met
    writer.close()
    reply = DNSRecord.parse(await udp_exchange(plain, valid))
    assert reply.header.rcode == RCODE.NOERROR and len(reply.rr) == 1
    [raw] = await tcp_exchange(plain, valid)
    assert DNSRecord.parse(raw).header.rcode == RCODE.NOERROR


async def test_a_responder_bug_is_a_servfail_and_one_log_line(
    caplog: pytest.LogCaptureFixture
) -> None:
    server, address = await serve(DnsConfig())

    def broken(packet: bytes, max_udp: int) -> bytes | None:
        raise RuntimeError("boom")

    server.responder.answer = broken  # type: ignore[method-assign]
    try:
        server.close()
        await server.listen(*address)  # listen again: protocols bind answer at start
        for _ in range(3):
            reply = DNSRecord.parse(await udp_exchange(address,
                                                       bytes(question("x.consul").pack())))
            assert (reply.header.rcode, str(reply.q.qname)) == (RCODE.SERVFAIL, "x.consul.")
        [raw] = await tcp_exchange(address, bytes(question("x.consul").pack()))
        assert DNSRecord.parse(raw).header.rcode == RCODE.SERVFAIL
    finally:
        server.close()
    errors = [r for r in caplog.records if "event=dns-error" in r.getMessage()]
    assert len(errors) == 1  # rate-limited


async def test_a_registration_is_answered_within_100_ms(tmp_path: Path) -> None:
    """The agent's path: registry -> watch -> RouteTable -> the next DNS answer."""
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    registry.start()
    table = RouteTable(VipAllocator("240.0.0.0/4"))
    changes = registry.watch()
    apply_change(table, await anext(changes))

    async def follow() -> None:
        async for change in changes:
            apply_change(table, change)

    follower = asyncio.get_running_loop().create_task(follow())
    config = DnsConfig()
    server = DnsServer(Responder(table, config), config)
    address = (HOST, free_port(HOST))
    await server.listen(*address)
    try:
        query = bytes(question("fresh.service.consul").pack())
        assert DNSRecord.parse(await udp_exchange(address, query)).header.rcode == \
            RCODE.NXDOMAIN
        loop = asyncio.get_running_loop()
        started = loop.time()
        await registry.register(Instance(id="fresh-1", name="fresh", address="10.0.0.5",
                                         port=80))
        while DNSRecord.parse(await udp_exchange(address, query)).header.rcode != RCODE.NOERROR:
            assert loop.time() - started < 0.1
        assert loop.time() - started < 0.1
    finally:
        server.close()
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await registry.close()


# -- recursors -----------------------------------------------------------------------


@pytest.fixture
async def upstreams() -> AsyncIterator[list[FakeUpstream]]:
    started = [await FakeUpstream("127.0.0.2").start(),
               await FakeUpstream("127.0.0.3").start()]
    yield started
    for upstream in started:
        upstream.close()


async def recursing(upstreams: list[FakeUpstream],
                    timeout: float = 0.3) -> tuple[DnsServer, tuple[str, int]]:
    return await serve(DnsConfig(recursors=tuple((u.host, u.port) for u in upstreams),
                                 recursor_timeout=timeout))


async def test_out_of_zone_names_are_forwarded_over_udp_and_tcp(
    upstreams: list[FakeUpstream]
) -> None:
    server, address = await recursing(upstreams)
    try:
        query = question("example.com")
        reply = DNSRecord.parse(await udp_exchange(address, bytes(query.pack())))
        assert reply.header.id == query.header.id  # the client's ID, not the forwarded one
        assert (reply.header.aa, reply.header.ra) == (0, 1)  # relayed: no authority
        assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.0"]
        [raw] = await tcp_exchange(address, bytes(query.pack()))
        assert [str(rr.rdata) for rr in DNSRecord.parse(raw).rr] == ["192.0.2.0"]
        for name in ("web.service.consul", "nope.service.consul", "consul"):
            reply = DNSRecord.parse(await udp_exchange(address, bytes(question(name).pack())))
            assert reply.header.aa == 1 and reply.header.ra == 1
        assert upstreams[0].seen == ["example.com.", "example.com."]  # never in-zone names
        assert upstreams[1].seen == []
    finally:
        server.close()


async def test_a_silent_recursor_is_skipped_then_all_failing_is_servfail(
    upstreams: list[FakeUpstream]
) -> None:
    upstreams[0].silent = True
    server, address = await recursing(upstreams)
    try:
        reply = DNSRecord.parse(await udp_exchange(address, bytes(question("a.example").pack())))
        assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.0"]
        assert (upstreams[0].seen, upstreams[1].seen) == (["a.example."], ["a.example."])
        upstreams[1].silent = True
        query = question("b.example")
        reply = DNSRecord.parse(await udp_exchange(address, bytes(query.pack())))
        assert (reply.header.id, reply.header.rcode, reply.header.ra) == (
            query.header.id, RCODE.SERVFAIL, 1)
        assert str(reply.q.qname) == "b.example." and reply.rr == []
    finally:
        server.close()


async def test_a_recursor_nobody_listens_on_fails_fast() -> None:
    closed = ("127.0.0.4", free_port("127.0.0.4"))
    server, address = await serve(DnsConfig(recursors=(closed,), recursor_timeout=5.0))
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = DNSRecord.parse(await udp_exchange(address, bytes(question("c.example").pack())))
        assert reply.header.rcode == RCODE.SERVFAIL
        assert loop.time() - started < 2.0  # ICMP port unreachable, not the 5 s timeout
    finally:
        server.close()


async def test_an_upstream_reply_too_big_for_the_client_is_cut_with_tc(
    upstreams: list[FakeUpstream]
) -> None:
    upstreams[0].answers = 100  # about 1.6 KB
    server, address = await recursing(upstreams)
    try:
        raw = await udp_exchange(address, bytes(question("big.example").pack()))
        reply = DNSRecord.parse(raw)
        assert (reply.header.tc, reply.rr, len(raw) <= 512) == (1, [], True)
        [raw] = await tcp_exchange(address, bytes(question("big.example").pack()))
        assert len(DNSRecord.parse(raw).rr) == 100
    finally:
        server.close()
