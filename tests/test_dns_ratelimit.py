"""DNS response rate limiting: the pure logic (token buckets per client, slip, episodes),
then the server over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord
from test_dns_server import _Datagram, make_table, question, serve, tcp_exchange

from consulate.dns import ratelimit
from consulate.dns import server as dns_server
from consulate.dns.config import DnsConfig
from consulate.dns.ratelimit import (
    ANSWER,
    DROP,
    QUIET_SECONDS,
    SLIP,
    RateLimitError,
    ResponseRateLimit,
    over_line,
    slip_reply,
    started_line,
)
from consulate.native import Capabilities


def test_a_burst_then_the_rate_per_client() -> None:
    limit = ResponseRateLimit(2)  # 2 per second, a burst of 2
    verdicts = [limit.check("10.0.0.1", 100.0) for _ in range(7)]
    # Over the limit: dropped, every second one slipped (TC=1), as BIND's slip 2.
    assert verdicts == [ANSWER, ANSWER, SLIP, DROP, SLIP, DROP, SLIP]
    assert limit.limited == 5
    assert limit.check("10.0.0.2", 100.0) == ANSWER  # another address, its own bucket
    assert limit.check("10.0.0.1", 100.5) == ANSWER  # half a second: one token back
    assert limit.check("10.0.0.1", 100.5) == DROP
    assert limit.check("10.0.0.1", 110.0) == ANSWER  # refilled up to the burst only
    assert limit.check("10.0.0.1", 110.0) == ANSWER
    assert limit.check("10.0.0.1", 110.0) == SLIP


def test_slip_zero_drops_every_limited_query() -> None:
    limit = ResponseRateLimit(1, slip=0)
    assert [limit.check("c", 0.0) for _ in range(4)] == [ANSWER, DROP, DROP, DROP]


def test_burst_can_be_set() -> None:
    limit = ResponseRateLimit(0.5, burst=3)
    assert [limit.check("c", 0.0) for _ in range(4)] == [ANSWER, ANSWER, ANSWER, SLIP]
    assert limit.check("c", 1.9) == DROP  # 0.95 of a token
    assert limit.check("c", 2.1) == ANSWER


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rate": 0}, "--dns-rate-limit 0 must be above 0"),
    ({"rate": -2}, "--dns-rate-limit -2 must be above 0"),
    ({"rate": 5, "burst": 0.5}, "burst 0.5 must be at least 1"),
    ({"rate": 5, "slip": -1}, "slip -1 must be 0"),
])
def test_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(RateLimitError, match=message):
        ResponseRateLimit(**kwargs)


def test_memory_stays_bounded_under_forged_addresses() -> None:
    limit = ResponseRateLimit(1, max_clients=4)
    for i in range(4):
        assert limit.check(f"10.0.0.{i}", 0.0) == ANSWER
    # Full buckets (clients under the limit) are forgotten first.
    assert limit.check("10.0.0.9", 5.0) == ANSWER
    assert len(limit._buckets) == 1
    for i in range(3):
        limit.check(f"10.0.1.{i}", 5.0)
    limit.check("10.0.1.0", 5.0)  # limited: its bucket is empty
    # No bucket has refilled: all are dropped rather than growing past the bound.
    limit.check("10.0.2.0", 5.0)
    assert len(limit._buckets) == 1


def test_one_episode_for_a_flood_and_its_end_after_quiet() -> None:
    limit = ResponseRateLimit(1)
    limit.check("10.0.0.1", 0.0)
    assert limit.episode_started() is None  # answered: no episode
    limit.check("10.0.0.1", 0.0)
    started = limit.episode_started()
    assert started is not None
    assert started_line(started) == ("event=limit-reached limit=dns_rate_limit value=1 "
                                     "client=10.0.0.1 action=drop")
    for t in (0.1, 0.2):
        limit.check("10.0.0.1", t)
        assert limit.episode_started() is None  # the same episode goes on
    limit.check("10.0.0.2", 0.3)
    limit.check("10.0.0.2", 0.4)
    assert limit.episode_over(0.4 + QUIET_SECONDS - 0.01) is None  # not quiet long enough
    over = limit.episode_over(0.4 + QUIET_SECONDS)
    assert over is not None
    assert over_line(over) == ("event=limit-cleared limit=dns_rate_limit value=1 refused=4 "
                               "clients=2 seconds=0.400")
    assert limit.episode_over(100.0) is None
    limit.check("10.0.0.1", 200.0)
    limit.check("10.0.0.1", 200.0)
    assert limit.episode_started() is not None  # a new one


def test_slip_reply_is_an_empty_truncated_answer_to_the_question() -> None:
    query = DNSRecord.question("web.service.consul", "SRV")
    query.header.id = 4321
    query.add_ar(EDNS0(udp_len=4096))
    reply = slip_reply(query.pack())
    assert reply is not None
    parsed = DNSRecord.parse(reply)
    assert (parsed.header.id, parsed.header.qr, parsed.header.tc, parsed.header.rd,
            parsed.header.opcode, parsed.header.rcode) == (4321, 1, 1, 1, 0, RCODE.NOERROR)
    assert [(str(q.qname), q.qtype) for q in parsed.questions] == \
        [("web.service.consul.", QTYPE.SRV)]
    assert (parsed.rr, parsed.auth, parsed.ar) == ([], [], [])
    assert reply == query.pack()[:2] + b"\x83\x00\x00\x01" + bytes(6) + \
        query.pack()[12:12 + len(b"\x03web\x07service\x06consul\x00") + 4]


@pytest.mark.parametrize("packet", [
    b"",
    b"\x12\x34\x01\x00\x00\x01",  # shorter than a header
    DNSRecord.question("web.service.consul").reply().pack(),  # a response (QR=1)
    b"\x12\x34\x01\x00\x00\x02" + bytes(6) + b"\x00\x00\x01\x00\x01" * 2,  # two questions
    b"\x12\x34\x01\x00\x00\x01" + bytes(6) + b"\x03web",  # a name cut short
])
def test_no_slip_reply_to_what_is_no_query(packet: bytes) -> None:
    assert slip_reply(packet) is None


@pytest.mark.parametrize("udp_path", ["batched", "datagram"])
async def test_over_real_sockets_udp_is_limited_and_tcp_is_not(
        udp_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The server on loopback, on both UDP paths (recvmmsg batches, and one datagram
    per callback without the native module); episodes end after 0.3 s here."""
    if udp_path == "datagram":
        monkeypatch.setattr(dns_server.native, "capabilities",
                            lambda: Capabilities(extension=False, splice=False))
    monkeypatch.setattr(ratelimit, "QUIET_SECONDS", 0.3)
    monkeypatch.setattr(dns_server, "QUIET_SECONDS", 0.3)
    caplog.set_level(logging.WARNING, logger="consulate.dns")
    server, address = await serve(DnsConfig(rate_limit=1))
    try:
        assert server.batched == (udp_path == "batched")
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(_Datagram,
                                                                  remote_addr=address)
        try:
            for query_id in range(1, 7):
                query = question("web.service.consul")
                query.header.id = query_id
                transport.sendto(query.pack())
            replies: dict[int, DNSRecord] = {}
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    while True:
                        reply = DNSRecord.parse(await protocol.replies.get())
                        replies[reply.header.id] = reply
        finally:
            transport.close()
        assert sorted(replies) == [1, 2, 4, 6]
        web = make_table().service("web")
        assert web is not None
        assert (replies[1].header.tc, [str(rr.rdata) for rr in replies[1].rr]) == \
            (0, [str(web.vip)])
        assert all((replies[i].header.tc, replies[i].rr) == (1, []) for i in (2, 4, 6))
        [over_tcp] = await tcp_exchange(address, question("web.service.consul").pack())
        assert DNSRecord.parse(over_tcp).rr
        assert server.rate_limit is not None and server.rate_limit.limited == 5
        assert server.rcodes[RCODE.NOERROR] == 5  # one answer, three slipped, one over TCP
        await asyncio.sleep(0.6)  # quiet: the episode is over
    finally:
        server.close()
    lines = [r.getMessage() for r in caplog.records if "dns_rate_limit" in r.getMessage()]
    assert lines[0] == ("event=limit-reached limit=dns_rate_limit value=1 client=127.0.0.1 "
                        "action=drop")
    assert re.fullmatch(r"event=limit-cleared limit=dns_rate_limit value=1 refused=5 "
                        r"clients=1 seconds=\d\.\d{3}", lines[1]), lines
    assert len(lines) == 2
