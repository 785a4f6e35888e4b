"""UDP flow decisions without netfilter: packet parsing (packets built by scapy), the
VIP:port -> endpoints rule, slots and the DNAT chain they become."""

from __future__ import annotations

import re

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPOption_NOP

from consulate.proxy.iptables import (
    RedirectRules,
    UdpTarget,
    udp_chain_rules,
    udp_mark,
)
from consulate.proxy.table import Endpoint, RouteTable
from consulate.proxy.udp_flows import (
    Datagram,
    Decision,
    FlowRouter,
    MalformedPacket,
    SlotsExhausted,
    SlotTable,
    parse_datagram,
    udp_endpoints,
    wanted_endpoints,
)
from consulate.proxy.vip import VipAllocator


def test_parse_reads_addresses_and_ports_of_a_udp_packet() -> None:
    packet = bytes(IP(src="10.100.1.13", dst="240.1.2.3") / UDP(sport=40000, dport=53) / b"q")
    assert parse_datagram(packet) == Datagram("10.100.1.13", 40000, "240.1.2.3", 53)


def test_parse_skips_ip_options_and_needs_only_the_headers() -> None:
    packet = bytes(IP(src="10.0.0.1", dst="240.0.0.9", options=[IPOption_NOP()] * 4)
                   / UDP(sport=1, dport=65535) / (b"x" * 1000))
    assert packet[0] & 0x0F == 6  # a 24-byte header
    assert parse_datagram(packet[:28]) == Datagram("10.0.0.1", 1, "240.0.0.9", 65535)


@pytest.mark.parametrize(("packet", "message"), [
    (b"\x45" * 10, "10 bytes is shorter than an IPv4 header"),
    (bytes(IP(dst="240.0.0.1") / ICMP()), "IP protocol 1, expected 17 (UDP)"),
    (b"\x60" + bytes(39), "IP version 6, expected 4"),
    (bytes(IP(dst="240.0.0.1") / UDP())[:22], "IPv4 header length 20 with 22 bytes copied"),
    (b"\x44" + bytes(IP(dst="240.0.0.1") / UDP())[1:], "IPv4 header length 16"),
], ids=["short", "icmp", "ipv6", "truncated-udp", "bad-ihl"])
def test_parse_refuses_what_is_not_an_ipv4_udp_packet(packet: bytes, message: str) -> None:
    with pytest.raises(MalformedPacket, match=re.escape(message)):
        parse_datagram(packet)


def _endpoint(ident: str, port: int, *tags: str, address: str = "10.100.1.11") -> Endpoint:
    return Endpoint(service="dns", id=ident, address=address, port=port, tags=tags)


def test_only_udp_tagged_endpoints_receive_datagrams_those_on_the_port_first() -> None:
    tcp = _endpoint("h:c:53", 53)
    udp53 = _endpoint("h:c:53:udp", 53, "udp")
    udp5353 = _endpoint("h:d:5353:udp", 5353, "udp", "primary")
    every = [tcp, udp53, udp5353]
    assert udp_endpoints(every, 53) == [udp53]
    assert udp_endpoints(every, 5353) == [udp5353]
    assert udp_endpoints(every, 9999) == [udp53, udp5353]  # any port of the VIP, as TCP
    assert udp_endpoints([tcp], 53) == []


def test_slots_are_stable_new_ones_take_the_next_number_and_freed_ones_wait() -> None:
    slots = SlotTable()
    a, b, c = ("10.0.0.1", 53), ("10.0.0.2", 53), ("10.0.0.3", 53)
    assert slots.update([b, a]) == ([UdpTarget(1, *a), UdpTarget(2, *b)], set())
    assert slots.update([b, c]) == ([UdpTarget(2, *b), UdpTarget(3, *c)], {a})
    assert slots.update([a, b, c]) == ([UdpTarget(2, *b), UdpTarget(3, *c), UdpTarget(4, *a)],
                                       set())
    assert slots.get(a) == 4 and slots.get(("10.9.9.9", 1)) is None


def test_slots_wrap_around_skipping_those_in_use() -> None:
    slots = SlotTable()
    slots._last = 0xFFFE  # as after 65,534 endpoints came and went
    kept = ("10.0.0.1", 1)
    slots.update([kept])  # slot 0xFFFF
    slots.update([kept, ("10.0.0.2", 1)])  # wraps to 1
    assert slots.update([kept, ("10.0.0.2", 1), ("10.0.0.3", 1)])[0] == [
        UdpTarget(1, "10.0.0.2", 1), UdpTarget(2, "10.0.0.3", 1),
        UdpTarget(0xFFFF, "10.0.0.1", 1)]


def test_more_endpoints_than_slots_is_refused_with_the_limit() -> None:
    with pytest.raises(SlotsExhausted, match="65536 UDP endpoints, at most 65535"):
        SlotTable().update((f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 1)
                           for i in range(65536))


def test_dnat_chain_has_one_rule_per_slot_then_the_queue() -> None:
    rules = RedirectRules("240.0.0.0/4", 10000, 0xC0A, udp_queue=7)
    assert udp_chain_rules(rules, [UdpTarget(1, "10.100.1.11", 53),
                                   UdpTarget(0xFFFF, "10.100.1.12", 5353)]) == [
        "-A CONSULATE-UDP -p udp -m mark --mark 0x10000/0xffff0000"
        " -j DNAT --to-destination 10.100.1.11:53",
        "-A CONSULATE-UDP -p udp -m mark --mark 0xffff0000/0xffff0000"
        " -j DNAT --to-destination 10.100.1.12:5353",
        "-A CONSULATE-UDP -m mark --mark 0x0/0xffff0000 -j NFQUEUE --queue-num 7 --queue-bypass",
    ]
    with pytest.raises(ValueError, match=re.escape("UDP endpoint slot 0 is out of range 1..65535")):
        udp_mark(0)


@pytest.fixture
def table() -> RouteTable:
    routes = RouteTable(VipAllocator("240.0.0.0/4"))
    routes.replace_all([
        Endpoint("echo", "echo-1", "10.100.1.11", 7000, ("udp",)),
        Endpoint("echo", "echo-2", "10.100.1.12", 7000, ("udp",)),
        Endpoint("echo", "echo-tcp", "10.100.1.13", 7000),
        Endpoint("web", "web-1", "10.100.1.14", 80),
    ])
    return routes


def _to(table: RouteTable, name: str, port: int = 7000) -> Datagram:
    service = table.service(name)
    assert service is not None
    return Datagram("10.100.1.20", 40000, str(service.vip), port)


def test_router_alternates_over_installed_udp_endpoints(table: RouteTable) -> None:
    router = FlowRouter(table)
    assert wanted_endpoints(table) == ({("10.100.1.11", 7000), ("10.100.1.12", 7000)}, [])
    router.installed = {("10.100.1.11", 7000): 5, ("10.100.1.12", 7000): 6}
    picks = [router.decide(_to(table, "echo")) for _ in range(4)]
    assert [(d.service, d.endpoint.id if d.endpoint else None, d.slot) for d in picks] == [
        ("echo", "echo-1", 5), ("echo", "echo-2", 6), ("echo", "echo-1", 5),
        ("echo", "echo-2", 6)]


def test_router_uses_only_endpoints_whose_rule_is_installed(table: RouteTable) -> None:
    router = FlowRouter(table)
    router.installed = {("10.100.1.12", 7000): 2}  # echo-1's rule is not written yet
    assert {router.decide(_to(table, "echo")).slot for _ in range(3)} == {2}
    router.installed = {}
    assert router.decide(_to(table, "echo")) == Decision("echo", reason="not-installed")


def test_router_refuses_services_without_udp_and_unknown_vips(table: RouteTable) -> None:
    router = FlowRouter(table)
    router.installed = {("10.100.1.14", 80): 1}
    refused = router.decide(_to(table, "web", 80))
    assert (refused.service, refused.endpoint, refused.reason) == ("web", None, "no-endpoints")
    table.remove("echo-1")
    table.remove("echo-2")
    table.remove("echo-tcp")
    unknown = router.decide(Datagram("10.100.1.20", 1, "240.0.0.1", 7000))
    assert (unknown.service, unknown.reason) == (None, "unknown-vip")


def test_udp_endpoints_named_by_host_name_get_no_dnat_rule(table: RouteTable) -> None:
    by_name = Endpoint("echo", "echo-3", "echo3.example.internal", 7000, ("udp",))
    table.upsert(by_name)
    assert wanted_endpoints(table) == ({("10.100.1.11", 7000), ("10.100.1.12", 7000)},
                                       [by_name])
