"""Query names -> lookups: every name form of issue 4, without sockets."""

from __future__ import annotations

import ipaddress

import pytest
from dnslib import DNSLabel

from consulate.dns.names import (
    AddrLookup,
    Apex,
    Form,
    Lookup,
    NameParser,
    NameServer,
    NodeLookup,
    NoSuchName,
    ReverseLookup,
    ServiceLookup,
    Structural,
    VirtualLookup,
    hex_label,
)

PARSER = NameParser(("consul.", "mesh.internal."), "dc1")


def parse(name: str) -> Lookup | None:
    return PARSER.parse(DNSLabel(name).label)


@pytest.mark.parametrize(
    ("name", "form"),
    [
        ("web.service.consul", ServiceLookup("web")),
        ("WEB.Service.CONSUL.", ServiceLookup("web")),
        ("v1.web.service.consul", ServiceLookup("web", tag="v1")),
        ("_web._tcp.service.consul", ServiceLookup("web")),
        ("_web._v1.service.consul", ServiceLookup("web", tag="v1")),
        ("_web._udp.service.consul", ServiceLookup("web", tag="udp")),
        ("_web._tcp.consul", ServiceLookup("web")),
        ("_web._v1.dc1.consul", ServiceLookup("web", tag="v1")),
        ("web.service.dc1.consul", ServiceLookup("web")),
        ("v1.web.service.dc1.consul", ServiceLookup("web", tag="v1")),
        ("_web._tcp.service.dc1.consul", ServiceLookup("web")),
        ("h1.node.consul", NodeLookup("h1")),
        ("h1.node.dc1.consul", NodeLookup("h1")),
        ("web.virtual.consul", VirtualLookup("web")),
        ("web.virtual.dc1.consul", VirtualLookup("web")),
        ("0a000001.addr.consul", AddrLookup(ipaddress.ip_address("10.0.0.1"))),
        ("0A000001.addr.dc1.consul", AddrLookup(ipaddress.ip_address("10.0.0.1"))),
        ("20010db8000000000000000000000001.addr.consul",
         AddrLookup(ipaddress.ip_address("2001:db8::1"))),
        ("web.svc.consul", ServiceLookup("web")),
        ("_http._tcp.web.svc.consul", ServiceLookup("web", tag="http")),
        ("_dns._udp.web.svc.consul", ServiceLookup("web", tag="dns")),
        ("consul", Apex()),
        ("ns.consul", NameServer()),
        # empty non-terminals on the way to real names: NODATA, not NXDOMAIN
        ("service.consul", Structural()),
        ("node.dc1.consul", Structural()),
        ("dc1.consul", Structural()),
        ("_tcp.service.consul", Structural()),
        ("_tcp.consul", Structural()),
        ("svc.consul", Structural()),
        ("_tcp.web.svc.consul", Structural()),
        # in the zone, but no such name
        ("web.consul", NoSuchName()),
        ("a.b.web.service.consul", NoSuchName()),
        ("web.service.dc2.consul", NoSuchName()),  # only our datacenter is known
        ("x.h1.node.consul", NoSuchName()),
        ("zz000001.addr.consul", NoSuchName()),
        ("0a0001.addr.consul", NoSuchName()),
        ("_web._.service.consul", NoSuchName()),
        ("_http._sctp.web.svc.consul", NoSuchName()),
        ("v1._web.service.consul", NoSuchName()),
    ],
)
def test_name_forms(name: str, form: Form) -> None:
    assert parse(name) == Lookup("consul.", form)


def test_the_alternative_domain_is_reported_so_answers_use_it() -> None:
    assert parse("web.service.mesh.internal") == Lookup("mesh.internal.", ServiceLookup("web"))
    assert parse("Mesh.Internal") == Lookup("mesh.internal.", Apex())


def test_reverse_names() -> None:
    assert parse("3.2.1.246.in-addr.arpa") == Lookup(
        "in-addr.arpa.", ReverseLookup(ipaddress.IPv4Address("246.1.2.3")))
    for name in ("2.1.246.in-addr.arpa", "03.2.1.246.in-addr.arpa", "256.2.1.10.in-addr.arpa",
                 "x.2.1.10.in-addr.arpa", "in-addr.arpa"):
        assert parse(name) is None, name


@pytest.mark.parametrize("name", ["example.com", "consul.example.com", "internal", "com"])
def test_other_names_are_not_ours(name: str) -> None:
    assert parse(name) is None


def test_non_ascii_labels_match_nothing() -> None:
    assert PARSER.parse((b"w\xffb", b"service", b"consul")) == Lookup(
        "consul.", ServiceLookup("w\ufffdb"))


def test_hex_label_is_what_the_parser_reads() -> None:
    for text in ("10.1.2.3", "2001:db8::1"):
        address = ipaddress.ip_address(text)
        assert parse(f"{hex_label(address)}.addr.consul") == Lookup("consul.",
                                                                  AddrLookup(address))
