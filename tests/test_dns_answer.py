"""The minimal responder's answers, section by section, from wire bytes (RFC 1035/2308)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from consulate.dns.answer import Responder

VIP = ipaddress.IPv4Address("246.1.2.3")


@pytest.fixture
def responder() -> Responder:
    return Responder(lambda name: VIP if name == "web" else None)


def ask(responder: Responder, name: str, qtype: str = "A") -> DNSRecord:
    query = DNSRecord.question(name, qtype)
    raw = responder.respond(query.pack())
    assert raw is not None
    reply = DNSRecord.parse(raw)
    assert reply.header.id == query.header.id
    assert reply.header.qr == 1 and reply.header.ra == 0
    assert reply.questions == query.questions
    return reply


def test_service_name_answers_its_vip_keeping_the_askers_case(responder: Responder) -> None:
    reply = ask(responder, "Web.Service.CONSUL", "A")
    assert reply.header.rcode == RCODE.NOERROR and reply.header.aa == 1
    assert [(str(rr.rname), rr.rtype, rr.ttl, str(rr.rdata)) for rr in reply.rr] == [
        ("Web.Service.CONSUL.", QTYPE.A, 0, "246.1.2.3")
    ]
    assert reply.auth == [] and reply.ar == []


def test_unknown_name_is_nxdomain_with_the_zone_soa(responder: Responder) -> None:
    for name in ("db.service.consul", "x.web.service.consul", "web.node.consul"):
        reply = ask(responder, name)
        assert reply.header.rcode == RCODE.NXDOMAIN and reply.header.aa == 1
        assert reply.rr == []
        [soa] = reply.auth
        assert (str(soa.rname), soa.rtype, soa.ttl) == ("consul.", QTYPE.SOA, 0)
        assert str(soa.rdata) == "ns.consul. hostmaster.consul. 1 3600 600 86400 0"


def test_other_type_for_a_known_name_is_nodata(responder: Responder) -> None:
    reply = ask(responder, "web.service.consul", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.rr == [] and [rr.rtype for rr in reply.auth] == [QTYPE.SOA]


def test_names_outside_the_zone_are_refused(responder: Responder) -> None:
    reply = ask(responder, "example.com")
    assert reply.header.rcode == RCODE.REFUSED and reply.header.aa == 0
    assert reply.rr == [] and reply.auth == []


def test_malformed_packets(responder: Responder) -> None:
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    # A header that promises a question that is not there: FORMERR, same id.
    reply = responder.respond(header + b"\x03abc")
    assert reply == struct.pack("!HHHHHH", 0x1234, 0x8101, 0, 0, 0, 0)
    assert responder.respond(b"\x12") is None  # not even a header: silence
    assert responder.respond(b"") is None
    response = bytearray(DNSRecord.question("web.service.consul").pack())
    response[2] |= 0x80  # QR set: a response, never answered (no loops)
    assert responder.respond(bytes(response)) is None


def test_other_opcodes_are_not_implemented(responder: Responder) -> None:
    query = DNSRecord.question("web.service.consul")
    query.header.opcode = 2  # STATUS
    reply = DNSRecord.parse(responder.respond(query.pack()) or b"")
    assert reply.header.rcode == RCODE.NOTIMP and reply.rr == []


def test_custom_domain() -> None:
    responder = Responder(lambda name: VIP, domain="mesh.internal.")
    assert str(ask(responder, "web.service.mesh.internal").rr[0].rdata) == "246.1.2.3"
    assert ask(responder, "web.service.consul").header.rcode == RCODE.REFUSED
