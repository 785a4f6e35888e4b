"""Garbage in, no crash out: random and mutated packets against the responder.

Every reply must be None (silence), FORWARD, or a DNS response carrying the
query's ID; and the responder must answer valid queries exactly as before.
"""

from __future__ import annotations

import random

from dnslib import EDNS0, RCODE, DNSRecord

from consulate.dns.answer import Responder
from consulate.dns.config import DnsConfig
from consulate.proxy.table import Endpoint, RouteTable
from consulate.proxy.vip import VipAllocator


def responder() -> Responder:
    table = RouteTable(VipAllocator("240.0.0.0/4"))
    table.replace_all(Endpoint("web", f"web-{i}", f"10.0.0.{i + 1}", 80, tags=("v1",))
                      for i in range(40))
    return Responder(table, DnsConfig(recursors=(("127.0.0.53", 53),), node_meta={"a": "b"}),
                     rng=random.Random(0))


def seeds() -> list[bytes]:
    packets = []
    for name, qtype in (("web.service.consul", "A"), ("_web._tcp.service.consul", "SRV"),
                        ("v1.web.service.consul", "ANY"), ("localhost.node.consul", "TXT"),
                        ("1.0.0.10.in-addr.arpa", "PTR"), ("example.com", "MX")):
        query = DNSRecord.question(name, qtype)
        packets.append(bytes(query.pack()))
        query.add_ar(EDNS0(udp_len=4096))
        packets.append(bytes(query.pack()))
    return packets


def mutate(packet: bytes, rng: random.Random) -> bytes:
    data = bytearray(packet)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.5 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.7:
            del data[rng.randrange(len(data) + 1):]
        elif choice < 0.85:
            data[rng.randrange(len(data) + 1):0] = rng.randbytes(rng.randint(1, 8))
        elif len(data) >= 12:
            data[4:12] = rng.randbytes(8)  # lie about the section counts
    return bytes(data)


LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*"


def well_formed(rng: random.Random) -> bytes:
    """A query that is structurally plausible but odd: random labels (some past 63
    octets, names past DNS's 255), any type and class, random flags, maybe an OPT."""
    # lengths past 63 are the reserved label types 0x40-0xBF
    labels = [bytes(rng.choices(LETTERS, k=rng.choice((rng.randint(1, 63), 64, 100, 191))))
              for _ in range(rng.randint(0, 6))]
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    edns = rng.random() < 0.5
    header = (rng.randbytes(2) + bytes([rng.randrange(256) & 0x7F, rng.randrange(256)])
              + b"\x00\x01\x00\x00\x00\x00" + (b"\x00\x01" if edns else b"\x00\x00"))
    opt = b"\x00\x00\x29" + rng.randbytes(8) if edns else b""
    return header + name + rng.randbytes(4) + opt[:9] + b"\x00\x00" * bool(edns)


def check(packet: bytes, reply: bytes | None) -> None:
    if reply:
        assert len(reply) >= 12
        assert reply[:2] == packet[:2]
        assert reply[2] & 0x80  # a response


def test_random_and_mutated_packets_never_raise_and_valid_queries_still_work() -> None:
    subject = responder()
    valid = DNSRecord.question("web.service.consul")
    before = subject.answer(bytes(valid.pack()), 1232)
    rng = random.Random(20240604)
    base = seeds()
    for _ in range(6000):
        packet = rng.randbytes(rng.randint(0, 80))
        check(packet, subject.answer(packet, 1232))
    for _ in range(20000):
        packet = mutate(rng.choice(base), rng)
        check(packet, subject.answer(packet, rng.choice((512, 1232, 65535))))
    for _ in range(5000):
        packet = well_formed(rng)
        check(packet, subject.answer(packet, rng.choice((512, 1232, 65535))))
    assert subject.answer(bytes(valid.pack()), 1232) == before
    reply = DNSRecord.parse(subject.answer(bytes(
        DNSRecord.question("nosuch.service.consul").pack()), 1232) or b"")
    assert reply.header.rcode == RCODE.NXDOMAIN
