"""Query names -> typed lookups: which question a name asks, before any data is read.

The name forms are Consul's, matched case-insensitively, in the primary domain or the
alternative one (the answer is given in the domain that was asked), each with an
optional datacenter label before the domain (``web.service.dc1.consul``):

==========================================  ==========================================
``<svc>.service``                           a service
``<tag>.<svc>.service``                     its instances with a tag
``_<svc>._<tag>[.service]``                 RFC 2782; ``_tcp`` as the tag means no tag
``<node>.node``                             a node
``<svc>.virtual``                           the service's virtual IP
``<hex>.addr``                              an address spelled in hex (8 or 32 digits)
``<svc>.svc``, ``_<port>._<proto>.<svc>.svc``  Kubernetes-style alias (no datacenter):
                                            ``<port>`` is matched as a tag, ``<proto>``
                                            is ``tcp`` or ``udp``
``ns``                                      the zone's name server
``d.c.b.a.in-addr.arpa``                    reverse lookup (PTR)
==========================================  ==========================================

Names that are only a step on the way to one of these (``service.consul``,
``dc1.consul``, ``_tcp.service.consul``) exist without records of their own: they
answer NODATA, not NXDOMAIN, because an NXDOMAIN would tell a resolver that
minimises query names (RFC 9156) that nothing below them exists (RFC 8020).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

REVERSE_ZONE = "in-addr.arpa."
_TYPE_LABELS = frozenset({"service", "node", "virtual", "addr"})
_K8S_PROTOCOLS = frozenset({"tcp", "udp"})


@dataclass(frozen=True)
class Apex:
    """The zone itself: SOA and NS."""


@dataclass(frozen=True)
class NameServer:
    """``ns.<zone>``, the target of the zone's NS record."""


@dataclass(frozen=True)
class Structural:
    """An empty non-terminal: the name exists, with no records (NODATA)."""


@dataclass(frozen=True)
class NoSuchName:
    """Inside the zone but no form matches (NXDOMAIN)."""


@dataclass(frozen=True)
class ServiceLookup:
    service: str
    tag: str | None = None


@dataclass(frozen=True)
class VirtualLookup:
    service: str


@dataclass(frozen=True)
class NodeLookup:
    node: str


@dataclass(frozen=True)
class AddrLookup:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ReverseLookup:
    """A PTR name; whether it is ours depends on the address (see records.py)."""

    address: ipaddress.IPv4Address


Form = (Apex | NameServer | Structural | NoSuchName | ServiceLookup | VirtualLookup
        | NodeLookup | AddrLookup | ReverseLookup)


@dataclass(frozen=True)
class Lookup:
    """A parsed name: the zone it was asked in (as configured) and what it asks for."""

    zone: str
    form: Form


def _text(label: bytes) -> str:
    # Every name we serve is ASCII; other bytes become U+FFFD and match nothing.
    return label.decode("ascii", "replace").lower()


def _zone_labels(zone: str) -> tuple[str, ...]:
    return tuple(part for part in zone.lower().split(".") if part)


class NameParser:
    """Classifies query names for a set of zones and one datacenter."""

    def __init__(self, zones: tuple[str, ...], datacenter: str) -> None:
        # Longest zone first, so an alternative domain below the primary one wins.
        self._zones = sorted(((_zone_labels(z), z) for z in zones),
                             key=lambda zone: len(zone[0]), reverse=True)
        self._reverse = _zone_labels(REVERSE_ZONE)
        self._datacenter = datacenter.lower()

    def parse(self, labels: tuple[bytes, ...]) -> Lookup | None:
        """The lookup a query name asks for, or None when the name is not in our zones."""
        names = tuple(_text(label) for label in labels)
        for zone_labels, zone in self._zones:
            if names[len(names) - len(zone_labels):] == zone_labels:
                return Lookup(zone, self._in_zone(list(names[:len(names) - len(zone_labels)])))
        if len(names) == 6 and names[4:] == self._reverse:
            address = _reverse_address(names[:4])
            if address is not None:
                return Lookup(REVERSE_ZONE, ReverseLookup(address))
        return None

    def _in_zone(self, rel: list[str]) -> Form:
        if not rel:
            return Apex()
        if rel == ["ns"]:
            return NameServer()
        if rel[-1] == "svc":
            return _kubernetes(rel[:-1])
        if rel[-1] == self._datacenter:
            rel = rel[:-1]
            if not rel:
                return Structural()
        kind = rel[-1]
        if kind in _TYPE_LABELS:
            return _typed(kind, rel[:-1])
        if all(label.startswith("_") for label in rel):
            return _rfc2782(rel)  # the form without ".service"
        return NoSuchName()


def _typed(kind: str, rel: list[str]) -> Form:
    if not rel:
        return Structural()
    if kind == "service":
        return _rfc2782(rel) if rel[0].startswith("_") else _service(rel)
    if len(rel) != 1:
        return NoSuchName()
    if kind == "node":
        return NodeLookup(rel[0])
    if kind == "virtual":
        return VirtualLookup(rel[0])
    address = _hex_address(rel[0])
    return AddrLookup(address) if address is not None else NoSuchName()


def _service(rel: list[str]) -> Form:
    if len(rel) == 1:
        return ServiceLookup(rel[0])
    if len(rel) == 2 and not rel[1].startswith("_"):
        return ServiceLookup(rel[1], tag=rel[0])
    return NoSuchName()


def _rfc2782(rel: list[str]) -> Form:
    """``_<svc>._<tag>``: Consul treats the protocol label ``_tcp`` as no tag at all."""
    if len(rel) == 1:
        return Structural()  # _tcp.service.consul, the parent of _web._tcp.service.consul
    if len(rel) != 2 or not all(label.startswith("_") and len(label) > 1 for label in rel):
        return NoSuchName()
    service, tag = rel[0][1:], rel[1][1:]
    return ServiceLookup(service, None if tag == "tcp" else tag)


def _kubernetes(rel: list[str]) -> Form:
    """``<svc>.svc`` and ``_<port>._<proto>.<svc>.svc``, the alias Kubernetes users know."""
    if not rel:
        return Structural()
    if len(rel) == 1:
        return ServiceLookup(rel[0])
    if len(rel) == 2 and rel[0].startswith("_"):
        return Structural()  # _tcp.web.svc
    if (len(rel) == 3 and rel[0].startswith("_") and len(rel[0]) > 1
            and rel[1].startswith("_") and rel[1][1:] in _K8S_PROTOCOLS):
        return ServiceLookup(rel[2], tag=rel[0][1:])
    return NoSuchName()


def _hex_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Consul's ``<hex>.addr``: 8 hex digits for IPv4, 32 for IPv6."""
    if len(text) not in (8, 32):
        return None
    try:
        packed = bytes.fromhex(text)
    except ValueError:
        return None
    return ipaddress.IPv4Address(packed) if len(packed) == 4 else ipaddress.IPv6Address(packed)


def _reverse_address(octets: tuple[str, ...]) -> ipaddress.IPv4Address | None:
    # Only canonical decimal octets ("7", never "007"): one name per address.
    if not all(o.isascii() and o.isdigit() and o == str(int(o)) and int(o) <= 255
               for o in octets):
        return None
    return ipaddress.IPv4Address(".".join(reversed(octets)))


def hex_label(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The ``<hex>.addr`` label of an address: the inverse of what the parser reads."""
    return address.packed.hex()
