"""The responder's answers, section by section, from wire bytes (issue 4, points 1-7).

Queries are built with dnslib and answered by ``Responder.answer`` directly: no
sockets. Records whose order is random per query are compared sorted.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable
from typing import Any

import pytest
from dnslib import CLASS, EDNS0, QTYPE, RCODE, RR, DNSRecord, EDNSOption

from consulate.dns import answer as answer_module
from consulate.dns.answer import FORWARD, Responder
from consulate.dns.config import DnsConfig, SoaTimers, TtlPolicy
from consulate.dns.wire import STREAM
from consulate.proxy.table import Endpoint, RouteTable
from consulate.proxy.vip import VipAllocator

SOA_TEXT = "ns.consul. hostmaster.consul. {serial} 3600 600 86400 0"


def make_table(*endpoints: Endpoint) -> RouteTable:
    table = RouteTable(VipAllocator("240.0.0.0/4"))
    table.replace_all(endpoints)
    return table


@pytest.fixture
def table() -> RouteTable:
    table = make_table(
        Endpoint("web", "web-1", "10.0.0.1", 8080, tags=("v1",), node="h1"),
        Endpoint("web", "web-2", "10.0.0.2", 8081, tags=("v2", "V1"), node="h1", weight=3),
        Endpoint("db", "db-1", "10.0.1.5", 5432, node="h2"),
        Endpoint("gone", "gone-1", "10.0.0.9", 80, node="h1"),
    )
    table.remove("gone-1")  # the service keeps its VIP, without instances
    return table


def make_responder(table: RouteTable, **options: Any) -> Responder:
    config = DnsConfig(**{"node": "h1", "node_address": "10.0.0.1", **options})
    return Responder(table, config, rng=random.Random(7))


@pytest.fixture
def responder(table: RouteTable) -> Responder:
    return make_responder(table, node_meta={"rack": "r1", "zone": "a"})


def query(name: str, qtype: str = "A", *, edns: int | None = None, rd: int = 1) -> DNSRecord:
    asked = DNSRecord.question(name, qtype)
    asked.header.rd = rd
    if edns is not None:
        asked.add_ar(EDNS0(udp_len=edns))
    return asked


def ask(responder: Responder, name: str, qtype: str = "A", *, edns: int | None = None,
        max_udp: int = 1232, rd: int = 1) -> tuple[DNSRecord, bytes]:
    """The parsed reply and its bytes, checking what every reply must echo."""
    asked = query(name, qtype, edns=edns, rd=rd)
    raw = responder.answer(bytes(asked.pack()), max_udp)
    assert raw
    reply = DNSRecord.parse(raw)
    assert reply.header.id == asked.header.id
    assert reply.header.qr == 1 and reply.header.rd == rd
    assert reply.questions == asked.questions
    assert str(reply.q.qname) == str(asked.q.qname)  # the asker's case, exactly
    return reply, raw


def rows(records: Iterable[RR]) -> list[tuple[str, str, int, str]]:
    return sorted((str(rr.rname), QTYPE[rr.rtype], rr.ttl, str(rr.rdata)) for rr in records
                  if rr.rtype != QTYPE.OPT)


def vip(table: RouteTable, name: str) -> str:
    service = table.service(name)
    assert service is not None
    return str(service.vip)


def soa_row(table: RouteTable, zone: str = "consul.") -> tuple[str, str, int, str]:
    server = zone if zone != "in-addr.arpa." else "consul."
    return (zone, "SOA", 0,
            f"ns.{server} hostmaster.{server} {table.version} 3600 600 86400 0")


# -- point 1 and 2: name forms and answers ---------------------------------------


def test_service_a_is_the_vip_authoritatively(responder: Responder, table: RouteTable) -> None:
    reply, _ = ask(responder, "Web.Service.CONSUL")
    assert (reply.header.rcode, reply.header.aa, reply.header.tc, reply.header.ra) == (
        RCODE.NOERROR, 1, 0, 0)
    assert rows(reply.rr) == [("Web.Service.CONSUL.", "A", 0, vip(table, "web"))]
    assert reply.auth == [] and reply.ar == []


@pytest.mark.parametrize("name", ["web.service.consul", "web.service.dc1.consul",
                                  "_web._tcp.service.consul", "_web._tcp.consul",
                                  "web.svc.consul", "web.virtual.consul"])
def test_every_untagged_form_answers_the_vip(responder: Responder, table: RouteTable,
                                             name: str) -> None:
    reply, _ = ask(responder, name)
    assert rows(reply.rr) == [(f"{name}.", "A", 0, vip(table, "web"))]


def test_instances_mode_answers_instance_addresses(table: RouteTable) -> None:
    responder = make_responder(table, a_records="instances")
    reply, _ = ask(responder, "web.service.consul")
    assert rows(reply.rr) == [("web.service.consul.", "A", 0, "10.0.0.1"),
                              ("web.service.consul.", "A", 0, "10.0.0.2")]
    # the virtual name is the VIP in every mode
    assert rows(ask(responder, "web.virtual.consul")[0].rr) == [
        ("web.virtual.consul.", "A", 0, vip(table, "web"))]


@pytest.mark.parametrize(("name", "addresses"), [
    ("v1.web.service.consul", ["10.0.0.1", "10.0.0.2"]),  # tags match case-insensitively
    ("V2.web.service.consul", ["10.0.0.2"]),
    ("_web._v2.service.consul", ["10.0.0.2"]),
    ("_v2._tcp.web.svc.consul", ["10.0.0.2"]),
])
def test_a_tag_asks_for_instances_even_in_vip_mode(responder: Responder, name: str,
                                                   addresses: list[str]) -> None:
    reply, _ = ask(responder, name)
    assert rows(reply.rr) == [(f"{name}.", "A", 0, a) for a in addresses]


def test_srv_gives_weights_ports_targets_and_glue(responder: Responder) -> None:
    reply, _ = ask(responder, "_web._tcp.service.consul", "SRV")
    assert reply.header.aa == 1 and reply.header.tc == 0
    name = "_web._tcp.service.consul."
    assert rows(reply.rr) == [
        (name, "SRV", 0, "1 1 8080 h1.node.dc1.consul."),  # on its node's address
        (name, "SRV", 0, "1 3 8081 0a000002.addr.dc1.consul."),
    ]
    assert rows(reply.ar) == [("0a000002.addr.dc1.consul.", "A", 0, "10.0.0.2"),
                              ("h1.node.dc1.consul.", "A", 0, "10.0.0.1")]
    assert reply.auth == []


def test_srv_of_a_tag_and_of_the_plain_name(responder: Responder) -> None:
    reply, _ = ask(responder, "v2.web.service.consul", "SRV")
    assert rows(reply.rr) == [("v2.web.service.consul.", "SRV", 0,
                               "1 3 8081 0a000002.addr.dc1.consul.")]
    assert rows(reply.ar) == [("0a000002.addr.dc1.consul.", "A", 0, "10.0.0.2")]
    reply, _ = ask(responder, "db.service.consul", "SRV")
    assert rows(reply.rr) == [("db.service.consul.", "SRV", 0,
                               "1 1 5432 0a000105.addr.dc1.consul.")]


def test_srv_targets_resolve_to_their_glue(responder: Responder) -> None:
    for target, address in (("h1.node.dc1.consul", "10.0.0.1"),
                            ("0a000002.addr.dc1.consul", "10.0.0.2")):
        assert rows(ask(responder, target)[0].rr) == [(f"{target}.", "A", 0, address)]


def test_any_gives_the_address_records(responder: Responder, table: RouteTable) -> None:
    reply, _ = ask(responder, "web.service.consul", "ANY")
    assert rows(reply.rr) == [("web.service.consul.", "A", 0, vip(table, "web"))]


def test_own_node_has_its_address_and_meta_as_txt(responder: Responder) -> None:
    name = "H1.node.consul."
    reply, _ = ask(responder, name, "ANY")
    assert rows(reply.rr) == [(name, "A", 0, "10.0.0.1"), (name, "TXT", 0, '"rack=r1"'),
                              (name, "TXT", 0, '"zone=a"')]
    assert rows(ask(responder, name, "TXT")[0].rr) == [(name, "TXT", 0, '"rack=r1"'),
                                                       (name, "TXT", 0, '"zone=a"')]
    assert rows(ask(responder, name, "A")[0].rr) == [(name, "A", 0, "10.0.0.1")]


def test_other_nodes_answer_their_instances_addresses(responder: Responder,
                                                      table: RouteTable) -> None:
    reply, _ = ask(responder, "h2.node.consul")
    assert rows(reply.rr) == [("h2.node.consul.", "A", 0, "10.0.1.5")]
    reply, _ = ask(responder, "h2.node.consul", "TXT")  # no meta known: NODATA
    assert (reply.header.rcode, reply.rr, rows(reply.auth)) == (RCODE.NOERROR, [],
                                                                [soa_row(table)])


def test_virtual_answers_even_without_instances(responder: Responder,
                                                table: RouteTable) -> None:
    reply, _ = ask(responder, "gone.virtual.consul")
    assert rows(reply.rr) == [("gone.virtual.consul.", "A", 0, vip(table, "gone"))]


def test_addr_names(responder: Responder, table: RouteTable) -> None:
    assert rows(ask(responder, "0a000063.addr.consul")[0].rr) == [
        ("0a000063.addr.consul.", "A", 0, "10.0.0.99")]
    name = "20010db8000000000000000000000001.addr.consul."
    assert rows(ask(responder, name, "AAAA")[0].rr) == [(name, "AAAA", 0, "2001:db8::1")]
    reply, _ = ask(responder, name, "A")
    assert (reply.header.rcode, reply.rr, rows(reply.auth)) == (RCODE.NOERROR, [],
                                                                [soa_row(table)])


def test_zone_apex_soa_and_ns_with_glue(responder: Responder, table: RouteTable) -> None:
    reply, _ = ask(responder, "consul", "SOA")
    assert rows(reply.rr) == [soa_row(table)] and reply.ar == []
    reply, _ = ask(responder, "consul", "NS")
    assert rows(reply.rr) == [("consul.", "NS", 0, "ns.consul.")]
    assert rows(reply.ar) == [("ns.consul.", "A", 0, "10.0.0.1")]
    assert rows(ask(responder, "consul", "ANY")[0].rr) == [("consul.", "NS", 0, "ns.consul."),
                                                           soa_row(table)]
    assert rows(ask(responder, "ns.consul")[0].rr) == [("ns.consul.", "A", 0, "10.0.0.1")]


def test_ptr_for_vips_nodes_and_instances(responder: Responder, table: RouteTable) -> None:
    def ptr(address: str) -> DNSRecord:
        return ask(responder, ".".join(reversed(address.split("."))) + ".in-addr.arpa",
                   "PTR")[0]

    web_vip = vip(table, "web")
    reply = ptr(web_vip)
    assert reply.header.aa == 1
    assert [str(rr.rdata) for rr in reply.rr] == ["web.service.dc1.consul."]
    assert sorted(str(rr.rdata) for rr in ptr("10.0.0.1").rr) == [
        "h1.node.dc1.consul.", "web.service.dc1.consul."]
    assert [str(rr.rdata) for rr in ptr("10.0.1.5").rr] == ["db.service.dc1.consul."]
    assert [str(rr.rdata) for rr in ptr(vip(table, "gone")).rr] == ["gone.service.dc1.consul."]
    unassigned = ptr("240.0.0.1")  # the VIP range is ours: an unknown VIP does not exist
    assert unassigned.header.rcode == RCODE.NXDOMAIN
    assert rows(unassigned.auth) == [soa_row(table, "in-addr.arpa.")]
    foreign = ptr("192.0.2.1")  # not ours: refused (or forwarded, with recursors)
    assert (foreign.header.rcode, foreign.header.aa) == (RCODE.REFUSED, 0)


def test_answers_use_the_domain_that_was_asked(table: RouteTable) -> None:
    responder = make_responder(table, alt_domain="mesh.internal.")
    reply, _ = ask(responder, "_web._v2.service.Mesh.Internal", "SRV")
    assert [str(rr.rdata) for rr in reply.rr] == ["1 3 8081 0a000002.addr.dc1.mesh.internal."]
    assert rows(reply.ar) == [("0a000002.addr.dc1.mesh.internal.", "A", 0, "10.0.0.2")]
    reply, _ = ask(responder, "nope.service.mesh.internal")
    assert rows(reply.auth) == [soa_row(table, "mesh.internal.")]
    assert rows(ask(responder, "web.service.consul")[0].rr) == [
        ("web.service.consul.", "A", 0, vip(table, "web"))]


# -- point 3: negative answers and errors ----------------------------------------


@pytest.mark.parametrize("name", [
    "nosuch.service.consul", "gone.service.consul", "v3.web.service.consul",
    "web.service.dc2.consul", "nosuch.node.consul", "nosuch.virtual.consul", "web.consul",
])
def test_unknown_names_and_services_without_instances_are_nxdomain(
    responder: Responder, table: RouteTable, name: str
) -> None:
    reply, _ = ask(responder, name)
    assert (reply.header.rcode, reply.header.aa) == (RCODE.NXDOMAIN, 1)
    assert reply.rr == [] and reply.ar == []
    assert rows(reply.auth) == [soa_row(table)]


@pytest.mark.parametrize(("name", "qtype"), [
    ("web.service.consul", "AAAA"), ("web.service.consul", "TXT"),
    ("web.virtual.consul", "SRV"), ("h1.node.consul", "AAAA"), ("consul", "A"),
    ("service.consul", "A"), ("dc1.consul", "SRV"), ("_tcp.service.consul", "SRV"),
])
def test_names_without_records_of_the_type_are_nodata(
    responder: Responder, table: RouteTable, name: str, qtype: str
) -> None:
    reply, _ = ask(responder, name, qtype)
    assert (reply.header.rcode, reply.header.aa) == (RCODE.NOERROR, 1)
    assert reply.rr == [] and rows(reply.auth) == [soa_row(table)]


def test_soa_fields_and_negative_ttl_are_configurable(table: RouteTable) -> None:
    responder = make_responder(table, soa=SoaTimers(refresh=100, retry=20, expire=3000,
                                                    min_ttl=30))
    reply, _ = ask(responder, "nosuch.service.consul")
    assert rows(reply.auth) == [("consul.", "SOA", 30, f"ns.consul. hostmaster.consul. "
                                                       f"{table.version} 100 20 3000 30")]


def test_soa_serial_follows_the_table(responder: Responder, table: RouteTable) -> None:
    before = ask(responder, "consul", "SOA")[0].rr[0].rdata.times[0]
    table.upsert(Endpoint("api", "api-1", "10.0.0.7", 80))
    assert ask(responder, "consul", "SOA")[0].rr[0].rdata.times[0] == before + 1


@pytest.mark.parametrize("qtype", ["AXFR", "IXFR"])
def test_zone_transfers_are_not_implemented(responder: Responder, qtype: str) -> None:
    reply, _ = ask(responder, "consul", qtype)
    assert (reply.header.rcode, reply.header.aa, reply.rr) == (RCODE.NOTIMP, 0, [])


def test_other_opcodes_are_not_implemented(responder: Responder) -> None:
    asked = query("web.service.consul")
    asked.header.opcode = 2  # STATUS
    reply = DNSRecord.parse(responder.answer(bytes(asked.pack()), 1232) or b"")
    assert (reply.header.rcode, reply.header.opcode, reply.rr) == (RCODE.NOTIMP, 2, [])


def test_other_classes_are_refused(responder: Responder) -> None:
    asked = query("version.bind", "TXT")
    asked.q.qclass = CLASS.CH
    reply = DNSRecord.parse(responder.answer(bytes(asked.pack()), 1232) or b"")
    assert (reply.header.rcode, reply.header.aa, reply.rr) == (RCODE.REFUSED, 0, [])


def test_malformed_packets(responder: Responder) -> None:
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    # A header that promises a question that is not there: FORMERR, same id, RD kept.
    assert responder.answer(header + b"\x03abc", 1232) == struct.pack(
        "!HHHHHH", 0x1234, 0x8101, 0, 0, 0, 0)
    assert responder.answer(b"\x12", 1232) is None  # not even a header: silence
    assert responder.answer(b"", 1232) is None
    response = bytearray(query("web.service.consul").pack())
    response[2] |= 0x80  # QR set: a response, never answered (no loops)
    assert responder.answer(bytes(response), 1232) is None


@pytest.mark.parametrize("name", [
    b"".join(bytes([63]) + b"x" * 63 for _ in range(4)) + b"\x00",  # 257 octets
    bytes([64]) + b"x" * 64 + b"\x00",  # a reserved label type (0x40), not a length
])
def test_names_past_dns_limits_are_formerr(responder: Responder, name: bytes) -> None:
    packet = struct.pack("!HHHHHH", 0x4321, 0x0100, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01"
    assert responder.answer(packet, 1232) == struct.pack("!HHHHHH", 0x4321, 0x8101, 0, 0, 0, 0)


def test_several_questions_or_opt_records_are_formerr(responder: Responder) -> None:
    two = query("web.service.consul")
    two.add_question(query("db.service.consul").q)
    reply = DNSRecord.parse(responder.answer(bytes(two.pack()), 1232) or b"")
    assert (reply.header.rcode, reply.rr) == (RCODE.FORMERR, [])
    opts = query("web.service.consul", edns=1232)
    opts.add_ar(EDNS0(udp_len=512))
    reply = DNSRecord.parse(responder.answer(bytes(opts.pack()), 1232) or b"")
    assert (reply.header.rcode, reply.rr) == (RCODE.FORMERR, [])


def test_edns_version_above_zero_is_badvers(responder: Responder) -> None:
    asked = query("web.service.consul")
    asked.add_ar(EDNS0(udp_len=1232, version=1))
    reply = DNSRecord.parse(responder.answer(bytes(asked.pack()), 1232) or b"")
    [opt] = reply.ar
    assert (reply.header.rcode, opt.rtype, opt.ttl >> 24, (opt.ttl >> 16) & 0xFF) == (
        0, QTYPE.OPT, 1, 0)  # extended rcode 16 = BADVERS, our version 0
    assert reply.rr == []


def test_edns_queries_get_an_opt_record_with_our_size(responder: Responder) -> None:
    reply, _ = ask(responder, "web.service.consul", edns=4096)
    [opt] = reply.ar
    assert (opt.rtype, opt.rclass, opt.ttl) == (QTYPE.OPT, 1232, 0)


# -- point 5: names outside the zone ---------------------------------------------


def test_out_of_zone_is_refused_without_recursors(responder: Responder) -> None:
    reply, _ = ask(responder, "example.com")
    assert (reply.header.rcode, reply.header.aa, reply.header.ra) == (RCODE.REFUSED, 0, 0)
    assert reply.rr == [] and reply.auth == []


def test_with_recursors_out_of_zone_names_are_forwarded_and_in_zone_never(
    table: RouteTable
) -> None:
    responder = make_responder(table, recursors=(("127.0.0.53", 53),))
    for _ in range(2):  # the decision is cached like an answer
        assert responder.answer(bytes(query("example.com").pack()), 1232) == FORWARD
        assert responder.answer(bytes(query("192.0.2.1.in-addr.arpa", "PTR").pack()),
                                1232) == FORWARD
    reply, _ = ask(responder, "nosuch.service.consul")
    assert (reply.header.rcode, reply.header.ra) == (RCODE.NXDOMAIN, 1)  # RA: we recurse
    reply, _ = ask(responder, "3.2.1.240.in-addr.arpa", "PTR")  # the VIP range is ours
    assert reply.header.rcode == RCODE.NXDOMAIN
    reply, _ = ask(responder, "example.com", rd=0)  # no recursion desired: refused
    assert reply.header.rcode == RCODE.REFUSED


# -- point 6: TTLs ----------------------------------------------------------------


def test_service_and_node_ttls(table: RouteTable) -> None:
    responder = make_responder(
        table, node_ttl=60,
        service_ttl=TtlPolicy({"web": 30, "w*": 20, "*": 5, "gone*": 1}))
    assert ask(responder, "web.service.consul")[0].rr[0].ttl == 30
    reply, _ = ask(responder, "web.service.consul", "SRV")
    assert {rr.ttl for rr in reply.rr + reply.ar} == {30}
    assert ask(responder, "db.service.consul")[0].rr[0].ttl == 5
    assert ask(responder, "gone.virtual.consul")[0].rr[0].ttl == 1
    assert ask(responder, "h1.node.consul")[0].rr[0].ttl == 60
    assert ask(responder, "0a000001.addr.consul")[0].rr[0].ttl == 60
    assert ask(responder, "1.0.0.10.in-addr.arpa", "PTR")[0].rr[0].ttl == 60
    assert ask(responder, "nosuch.service.consul")[0].auth[0].ttl == 0  # the SOA's min_ttl


def test_ttl_policy_prefers_exact_then_the_longest_prefix() -> None:
    policy = TtlPolicy({"web": 30, "w*": 20, "web-*": 25, "*": 5})
    assert [policy.ttl_for(n) for n in ("web", "WEB", "web-api", "wiki", "db")] == [
        30, 30, 25, 20, 5]
    assert TtlPolicy({"db": 9}).ttl_for("web") == 0  # Consul's default


# -- point 4: size, truncation, order ---------------------------------------------


def many(count: int, weight: int = 1) -> RouteTable:
    return make_table(*(Endpoint("big", f"big-{i:03d}", f"10.1.{i // 250}.{i % 250 + 1}",
                                 9000 + i, node="h9", weight=weight) for i in range(count)))


def check_srv_reply(reply: DNSRecord) -> list[str]:
    """The SRV targets, after checking each has exactly its glue in the additional."""
    targets = [str(rr.rdata.target) for rr in reply.rr]
    assert [rr.rtype for rr in reply.rr] == [QTYPE.SRV] * len(targets)
    glue = {str(rr.rname): str(rr.rdata) for rr in reply.ar if rr.rtype == QTYPE.A}
    assert sorted(glue) == sorted(targets)
    return targets


@pytest.mark.parametrize(("edns", "max_udp", "limit"), [
    (None, 1232, 512),     # no EDNS: RFC 1035's 512
    (300, 1232, 512),      # below 512 counts as 512
    (1232, 1232, 1232),
    (4096, 1232, 1232),    # the client's size, capped by --udp-max
    (4096, 4096, 4096),
    (1100, 1232, 1024),    # rounded down to a 256-byte step: fits, shares cache entries
])
def test_udp_answers_fit_and_say_when_cut(edns: int | None, max_udp: int, limit: int) -> None:
    responder = make_responder(many(200))
    reply, raw = ask(responder, "big.service.consul", "SRV", edns=edns, max_udp=max_udp)
    assert reply.header.tc == 1 and reply.header.rcode == RCODE.NOERROR
    assert limit - 60 < len(raw) <= limit  # one more SRV and its glue would not fit
    assert 0 < len(check_srv_reply(reply)) < 200


def test_tcp_gets_the_whole_set(responder: Responder) -> None:
    responder = make_responder(many(200))
    reply, raw = ask(responder, "big.service.consul", "SRV", edns=1232, max_udp=STREAM)
    assert reply.header.tc == 0 and len(raw) > 4096
    assert len(set(check_srv_reply(reply))) == 200


def test_small_answers_are_not_cut(responder: Responder) -> None:
    reply, raw = ask(responder, "web.service.consul", "SRV")
    assert reply.header.tc == 0 and len(reply.rr) == 2 and len(raw) < 512


def test_trimmed_answers_sample_instances_by_weight() -> None:
    table = make_table(*(Endpoint("big", f"light-{i:02d}", f"10.2.0.{i + 1}", 80, weight=1)
                         for i in range(30)),
                       *(Endpoint("big", f"heavy-{i:02d}", f"10.3.0.{i + 1}", 80, weight=9)
                         for i in range(30)))
    rng = random.Random(11)
    heavy = light = 0
    for _ in range(400):  # a fresh responder, so a fresh sample each time
        responder = Responder(table, DnsConfig(node="h1", node_address="10.0.0.1"), rng=rng)
        reply, _ = ask(responder, "big.service.consul", "SRV")
        assert reply.header.tc == 1
        kept = [str(rr.rdata.target).startswith("0a03") for rr in reply.rr]  # 10.3.x
        heavy += sum(kept)
        light += len(kept) - sum(kept)
    # About 6 of 60 kept, drawn without replacement at 9:1: close to 8 heavy for each
    # light one (a uniform sample would give 1).
    assert 6.5 < heavy / light < 9.5


def test_order_changes_from_query_to_query() -> None:
    table = make_table(*(Endpoint("web", f"web-{i}", f"10.0.0.{i + 1}", 80) for i in range(6)))
    responder = make_responder(table, a_records="instances")
    orders = {tuple(str(rr.rdata) for rr in ask(responder, "web.service.consul")[0].rr)
              for _ in range(16)}
    assert len(orders) > 4
    assert {tuple(sorted(order)) for order in orders} == {
        tuple(f"10.0.0.{i + 1}" for i in range(6))}


# -- point 7: the cache -------------------------------------------------------------


def test_a_cache_hit_parses_and_builds_nothing(responder: Responder,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    first = query("web.service.consul", edns=1232)
    raw = responder.answer(bytes(first.pack()), 1232)
    assert raw is not None

    def refuse(*args: object) -> None:
        raise AssertionError("a cache hit must not parse")

    monkeypatch.setattr(answer_module.DNSRecord, "parse", refuse)
    again = query("web.service.consul", edns=1232)
    again.header.id = (first.header.id + 1) % 65536
    assert responder.answer(bytes(again.pack()), 1232) == again.header.id.to_bytes(2, "big") + \
        raw[2:]


def test_edns_options_such_as_cookies_do_not_split_the_cache(
    responder: Responder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def with_cookie(cookie: bytes) -> bytes:
        asked = DNSRecord.question("web.service.consul")
        asked.header.id = 7
        asked.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(10, cookie)]))  # RFC 7873
        return bytes(asked.pack())

    first = responder.answer(with_cookie(b"\x01" * 8), 1232)
    monkeypatch.setattr(answer_module.DNSRecord, "parse", None)  # a hit must not parse
    assert responder.answer(with_cookie(b"\x02" * 8), 1232) == first


def test_a_registry_change_is_seen_by_the_next_query(responder: Responder,
                                                     table: RouteTable) -> None:
    assert ask(responder, "api.service.consul")[0].header.rcode == RCODE.NXDOMAIN
    table.upsert(Endpoint("api", "api-1", "10.0.0.7", 80))
    assert rows(ask(responder, "api.service.consul")[0].rr) == [
        ("api.service.consul.", "A", 0, vip(table, "api"))]
    table.remove("api-1")
    assert ask(responder, "api.service.consul")[0].header.rcode == RCODE.NXDOMAIN


def test_cache_keeps_case_flags_and_size_apart(responder: Responder) -> None:
    assert str(ask(responder, "web.service.consul")[0].rr[0].rname) == "web.service.consul."
    assert str(ask(responder, "WEB.service.consul")[0].rr[0].rname) == "WEB.service.consul."
    assert ask(responder, "web.service.consul", rd=0)[0].header.rd == 0
    assert ask(responder, "web.service.consul", edns=1232)[0].ar != []
    assert ask(responder, "web.service.consul")[0].ar == []
