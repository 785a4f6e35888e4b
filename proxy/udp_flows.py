"""Where a new UDP flow to a VIP goes: pure decisions, no sockets, no netfilter.

The rule that maps a VIP:port to UDP endpoints (a service name may have TCP and
UDP instances, and registrator marks the UDP ones with a ``udp`` tag and a
``:udp`` id suffix):

1. only the service's endpoints tagged ``udp`` receive datagrams;
2. among them, those registered on the datagram's destination port win, so a
   service with several UDP ports (53 and 5353, say) keeps each port apart;
3. when none is on that port, every ``udp`` endpoint is a candidate, so that, as
   with TCP, a client may use any port of the VIP (``dig @dns.service.consul``
   reaches a server registered on 5353).

Each distinct endpoint address:port owns a *slot* (1..65535): the packet mark
that its DNAT rule matches. Slots are handed out in increasing order and reused
only after wrapping around, so a datagram marked a moment before an endpoint
left can never be sent to a newcomer that inherited its slot.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from consulate.proxy.balance import RoundRobin
from consulate.proxy.iptables import MAX_UDP_SLOT, UdpTarget
from consulate.proxy.table import Endpoint, RouteTable

UDP_TAG = "udp"
_IPPROTO_UDP = 17

EndpointKey = tuple[str, int]  # (address, port)


class MalformedPacket(ValueError):
    """The queued bytes are not an IPv4 UDP datagram (the kernel sent us something else)."""


class Datagram(NamedTuple):
    source: str
    source_port: int
    destination: str
    destination_port: int


def parse_datagram(packet: bytes) -> Datagram:
    """The addresses of an IPv4 UDP packet as NFQUEUE hands it over (IP header first).

    Only the headers are needed, so the queue may copy just the first bytes.
    """
    if len(packet) < 20:
        raise MalformedPacket(f"{len(packet)} bytes is shorter than an IPv4 header")
    version_ihl, protocol = packet[0], packet[9]
    if version_ihl >> 4 != 4:
        raise MalformedPacket(f"IP version {version_ihl >> 4}, expected 4")
    if protocol != _IPPROTO_UDP:
        raise MalformedPacket(f"IP protocol {protocol}, expected 17 (UDP)")
    header = (version_ihl & 0x0F) * 4
    if header < 20 or len(packet) < header + 4:
        raise MalformedPacket(f"IPv4 header length {header} with {len(packet)} bytes copied")
    source_port, destination_port = struct.unpack_from("!HH", packet, header)
    return Datagram(str(ipaddress.IPv4Address(packet[12:16])), source_port,
                    str(ipaddress.IPv4Address(packet[16:20])), destination_port)


def udp_endpoints(endpoints: Sequence[Endpoint], port: int) -> list[Endpoint]:
    """The endpoints a datagram to ``port`` of the service's VIP may go to (see above)."""
    tagged = [e for e in endpoints if UDP_TAG in e.tags]
    on_port = [e for e in tagged if e.port == port]
    return on_port or tagged


def key_of(endpoint: Endpoint) -> EndpointKey:
    return endpoint.address, endpoint.port


def wanted_endpoints(table: RouteTable) -> tuple[set[EndpointKey], list[Endpoint]]:
    """Every address:port that some service routes UDP to (each needs a DNAT rule), and
    the ``udp`` endpoints that cannot have one: DNAT needs an IPv4 address, not a name."""
    wanted, unroutable = set(), []
    for service in table.services():
        for endpoint in service.endpoints:
            if UDP_TAG not in endpoint.tags:
                continue
            try:
                ipaddress.IPv4Address(endpoint.address)
            except ValueError:
                unroutable.append(endpoint)
                continue
            wanted.add(key_of(endpoint))
    return wanted, unroutable


class SlotsExhausted(Exception):
    """More distinct UDP endpoints than the mark has slots for."""


class SlotTable:
    """Stable slots for endpoint addresses: a slot lives as long as its endpoint."""

    def __init__(self) -> None:
        self._slots: dict[EndpointKey, int] = {}
        self._last = 0

    def get(self, key: EndpointKey) -> int | None:
        return self._slots.get(key)

    def update(self, wanted: Iterable[EndpointKey]) -> tuple[list[UdpTarget], set[EndpointKey]]:
        """Keep the slots of ``wanted`` endpoints, give new ones a slot, free the rest.

        Returns the DNAT targets (ordered by slot) and the endpoints that lost theirs.
        """
        wanted = set(wanted)
        gone = set(self._slots) - wanted
        for key in gone:
            del self._slots[key]
        if len(wanted) > MAX_UDP_SLOT:
            raise SlotsExhausted(f"{len(wanted)} UDP endpoints, at most {MAX_UDP_SLOT} fit "
                                 "the packet mark")
        taken = set(self._slots.values())
        for key in sorted(wanted - set(self._slots)):
            slot = self._last
            while True:
                slot = slot % MAX_UDP_SLOT + 1
                if slot not in taken:
                    break
            self._slots[key], self._last = slot, slot
            taken.add(slot)
        targets = sorted(UdpTarget(slot, *key) for key, slot in self._slots.items())
        return targets, gone


@dataclass(frozen=True)
class Decision:
    """Where a flow's first datagram goes: ``endpoint`` with mark slot ``slot``, or
    none (``endpoint`` None) with the ``reason``: ``unknown-vip`` and ``no-endpoints``
    are refusals, ``not-installed`` means the endpoints' rules are not written yet."""

    service: str | None
    endpoint: Endpoint | None = None
    slot: int = 0
    reason: str = ""


class FlowRouter:
    """Picks an endpoint for each new flow: round robin over the service's UDP endpoints
    that have a DNAT rule installed (``installed``), per VIP service."""

    def __init__(self, table: RouteTable) -> None:
        self._table = table
        self._balancers: dict[str, RoundRobin] = {}
        self.installed: dict[EndpointKey, int] = {}  # what CONSULATE-UDP routes now

    def decide(self, datagram: Datagram) -> Decision:
        try:
            vip = ipaddress.IPv4Address(datagram.destination)
        except ValueError:
            return Decision(None, reason="unknown-vip")
        service = self._table.service_by_vip(vip)
        if service is None:
            return Decision(None, reason="unknown-vip")
        installed = self.installed
        routed = udp_endpoints(service.endpoints, datagram.destination_port)
        candidates = [e for e in routed if key_of(e) in installed]
        balancer = self._balancers.setdefault(service.name, RoundRobin())
        picked = balancer.candidates(candidates, 1)
        if not picked:
            # Endpoints whose DNAT rules are being written: a moment, not a refusal.
            return Decision(service.name, reason="not-installed" if routed else "no-endpoints")
        return Decision(service.name, picked[0], installed[key_of(picked[0])])
