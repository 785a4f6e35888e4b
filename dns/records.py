"""Resource records for a lookup, read from the RouteTable (sans-IO, no packing).

What each name answers (the rules of issue 4, points 1-3):

- A service answers only while it has instances: none (or none with the tag asked)
  is NXDOMAIN. A/AAAA give the VIP in ``vip`` mode and the instance addresses in
  ``instances`` mode; a tag-filtered name always gives instance addresses, because
  the VIP routes to every instance and so cannot honour a tag. SRV gives one record
  per instance (priority 1, weight from the registration) with its target's address
  as glue. ANY gives the address records.
- ``<svc>.virtual`` gives the VIP of every known service, even without instances
  (the VIP is stable and connecting to it is refused cleanly), as Consul does.
- ``<node>.node`` gives the node's address and its metadata as TXT ``key=value``
  (RFC 1464). The agent knows its own node's address (--advertise); for another
  node it only knows the addresses of the instances registered from it, and answers
  those: with registrator publishing host ports they are that host's address.
- SRV targets are ``<node>.node.<dc>.<zone>`` when the instance listens on its
  node's address, else ``<hex>.addr.<dc>.<zone>`` (Consul's two forms); either
  resolves to the glue's address.
- PTR: the agent's address names its node, a VIP names its service, an instance
  address names its services. Addresses in the VIP range are ours even when
  unassigned (NXDOMAIN); other unknown addresses are not (forwarded or refused).
- Negative answers carry the zone's SOA in the authority section (RFC 2308):
  NXDOMAIN for a name that does not exist, NOERROR without answers (NODATA) for
  one that exists without records of the type asked.

TTLs: ``--service-ttl`` for service, virtual and glue records, ``--node-ttl`` for
node, addr, ns and PTR records, the SOA's ``min_ttl`` for the SOA itself.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from dnslib import AAAA, NS, PTR, QTYPE, RCODE, RR, SOA, SRV, TXT, A, DNSLabel

from consulate.dns.config import DnsConfig
from consulate.dns.names import (
    REVERSE_ZONE,
    AddrLookup,
    Apex,
    Lookup,
    NameServer,
    NodeLookup,
    NoSuchName,
    ReverseLookup,
    ServiceLookup,
    Structural,
    VirtualLookup,
    hex_label,
)
from consulate.proxy.table import Endpoint, RouteTable

SRV_PRIORITY = 1  # Consul's: every instance is equally preferred, weights split the load
_ADDRESS_TYPES = frozenset({QTYPE.A, QTYPE.AAAA})
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Unit:
    """One answer record and the glue it needs: trimming keeps or drops it whole.

    Units of one answer that point at the same target share its glue record
    object, so a packer can send each glue record once.
    """

    weight: int
    record: RR
    glue: tuple[RR, ...] = ()


@dataclass
class Answer:
    """What a name answers before ordering, trimming and packing."""

    rcode: int = RCODE.NOERROR
    units: list[Unit] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)


@dataclass
class _Node:
    name: str
    addresses: tuple[str, ...]
    meta: dict[str, str]


def _address_record(name: DNSLabel, address: str, ttl: int) -> RR:
    if ipaddress.ip_address(address).version == 4:
        return RR(name, QTYPE.A, ttl=ttl, rdata=A(address))
    return RR(name, QTYPE.AAAA, ttl=ttl, rdata=AAAA(address))


def _wants(qtype: int, rtype: int) -> bool:
    return qtype == rtype or qtype == QTYPE.ANY


class RecordBuilder:
    """Builds the answer to one lookup from the table as it is now."""

    def __init__(self, table: RouteTable, config: DnsConfig) -> None:
        self._table = table
        self._config = config
        self._indexed_version = -1
        self._nodes: dict[str, _Node] = {}
        self._services_at: dict[str, list[str]] = {}

    def build(self, lookup: Lookup, qname: DNSLabel, qtype: int) -> Answer | None:
        """The answer, or None when the name turned out not to be ours (a PTR name
        of an address we know nothing about, outside the VIP range)."""
        form = lookup.form
        zone = lookup.zone
        if isinstance(form, ServiceLookup):
            return self._service(form, qname, qtype, zone)
        if isinstance(form, VirtualLookup):
            return self._virtual(form, qname, qtype, zone)
        if isinstance(form, NodeLookup):
            return self._node(form, qname, qtype, zone)
        if isinstance(form, AddrLookup):
            records = [_address_record(qname, str(form.address), self._config.node_ttl)]
            return self._positive(records, qtype, zone)
        if isinstance(form, ReverseLookup):
            return self._reverse(form, qname, qtype)
        if isinstance(form, Apex):
            return self._apex(qtype, zone)
        if isinstance(form, NameServer):
            records = [_address_record(qname, self._config.node_address, self._config.node_ttl)]
            return self._positive(records, qtype, zone)
        if isinstance(form, Structural):
            return self._negative(RCODE.NOERROR, zone)
        assert isinstance(form, NoSuchName)
        return self._negative(RCODE.NXDOMAIN, zone)

    # -- forms -----------------------------------------------------------------

    def _service(self, form: ServiceLookup, qname: DNSLabel, qtype: int, zone: str) -> Answer:
        service = self._table.service_folded(form.service)
        endpoints: Sequence[Endpoint] = service.endpoints if service is not None else ()
        if form.tag is not None:
            endpoints = [e for e in endpoints if form.tag in (t.lower() for t in e.tags)]
        if service is None or not endpoints:
            return self._negative(RCODE.NXDOMAIN, zone)
        ttl = self._config.service_ttl.ttl_for(service.name)
        if qtype == QTYPE.SRV:
            return Answer(units=self._srv_units(qname, endpoints, ttl, zone))
        if qtype not in _ADDRESS_TYPES and qtype != QTYPE.ANY:
            return self._negative(RCODE.NOERROR, zone)
        if self._config.a_records == "vip" and form.tag is None:
            return self._positive([_address_record(qname, str(service.vip), ttl)], qtype, zone)
        weights: dict[str, int] = {}
        for endpoint in endpoints:  # one record per address: an RRset has no duplicates
            weights[endpoint.address] = weights.get(endpoint.address, 0) + endpoint.weight
        units = [Unit(weight, _address_record(qname, address, ttl))
                 for address, weight in weights.items()]
        return self._filtered(units, qtype, zone)

    def _srv_units(self, qname: DNSLabel, endpoints: Sequence[Endpoint], ttl: int,
                   zone: str) -> list[Unit]:
        glue: dict[str, RR] = {}
        units = []
        for endpoint in endpoints:
            target = self._target(endpoint, zone)
            if target not in glue:
                glue[target] = _address_record(DNSLabel(target), endpoint.address, ttl)
            srv = SRV(SRV_PRIORITY, endpoint.weight, endpoint.port, target)
            units.append(Unit(endpoint.weight, RR(qname, QTYPE.SRV, ttl=ttl, rdata=srv),
                              (glue[target],)))
        return units

    def _target(self, endpoint: Endpoint, zone: str) -> str:
        cfg = self._config
        if (endpoint.node == cfg.node and endpoint.address == cfg.node_address
                and _LABEL.match(cfg.node)):
            return f"{cfg.node}.node.{cfg.datacenter}.{zone}"
        label = hex_label(ipaddress.ip_address(endpoint.address))
        return f"{label}.addr.{cfg.datacenter}.{zone}"

    def _virtual(self, form: VirtualLookup, qname: DNSLabel, qtype: int, zone: str) -> Answer:
        service = self._table.service_folded(form.service)
        if service is None:
            return self._negative(RCODE.NXDOMAIN, zone)
        ttl = self._config.service_ttl.ttl_for(service.name)
        return self._positive([_address_record(qname, str(service.vip), ttl)], qtype, zone)

    def _node(self, form: NodeLookup, qname: DNSLabel, qtype: int, zone: str) -> Answer:
        node = self._index_nodes().get(form.node)
        if node is None:
            return self._negative(RCODE.NXDOMAIN, zone)
        ttl = self._config.node_ttl
        records = [_address_record(qname, address, ttl) for address in node.addresses]
        records += [RR(qname, QTYPE.TXT, ttl=ttl, rdata=TXT(f"{key}={value}".encode()))
                    for key, value in sorted(node.meta.items())]
        return self._positive(records, qtype, zone)

    def _reverse(self, form: ReverseLookup, qname: DNSLabel, qtype: int) -> Answer | None:
        cfg = self._config
        address = str(form.address)
        suffix = f"{cfg.datacenter}.{cfg.domain}"
        names = []
        if address == cfg.node_address and _LABEL.match(cfg.node):
            names.append(f"{cfg.node}.node.{suffix}")
        vip_service = self._table.service_by_vip(form.address)
        services = [vip_service.name] if vip_service is not None else []
        self._index_nodes()
        services += self._services_at.get(address, [])
        names += [f"{name}.service.{suffix}" for name in dict.fromkeys(services)]
        if not names:
            if form.address in self._table.vip_network:
                return self._negative(RCODE.NXDOMAIN, REVERSE_ZONE)
            return None
        records = [RR(qname, QTYPE.PTR, ttl=cfg.node_ttl, rdata=PTR(name)) for name in names]
        return self._positive(records, qtype, REVERSE_ZONE)

    def _apex(self, qtype: int, zone: str) -> Answer:
        cfg = self._config
        server = DNSLabel(f"ns.{zone}")
        glue = _address_record(server, cfg.node_address, cfg.node_ttl)
        units = []
        if _wants(qtype, QTYPE.SOA):
            units.append(Unit(1, self._soa(zone)))
        if _wants(qtype, QTYPE.NS):
            units.append(Unit(1, RR(DNSLabel(zone), QTYPE.NS, ttl=cfg.node_ttl,
                                    rdata=NS(server)), (glue,)))
        return Answer(units=units) if units else self._negative(RCODE.NOERROR, zone)

    # -- shared ----------------------------------------------------------------

    def _positive(self, records: list[RR], qtype: int, zone: str) -> Answer:
        return self._filtered([Unit(1, record) for record in records], qtype, zone)

    def _filtered(self, units: list[Unit], qtype: int, zone: str) -> Answer:
        """The units of the type asked (all for ANY); none left is NODATA."""
        kept = [u for u in units if _wants(qtype, u.record.rtype)]
        return Answer(units=kept) if kept else self._negative(RCODE.NOERROR, zone)

    def _negative(self, rcode: int, zone: str) -> Answer:
        return Answer(rcode=rcode, authority=[self._soa(zone)])

    def _soa(self, zone: str) -> RR:
        """The zone's SOA; its serial is the route table version, which changes
        exactly when the zone's data does."""
        cfg = self._config
        server = zone if zone != REVERSE_ZONE else cfg.domain
        times = (self._table.version, cfg.soa.refresh, cfg.soa.retry, cfg.soa.expire,
                 cfg.soa.min_ttl)
        return RR(DNSLabel(zone), QTYPE.SOA, ttl=cfg.soa.min_ttl,
                  rdata=SOA(DNSLabel(f"ns.{server}"), DNSLabel(f"hostmaster.{server}"), times))

    def _index_nodes(self) -> dict[str, _Node]:
        """Nodes by folded name and services by address, rebuilt once per table version."""
        if self._indexed_version == self._table.version:
            return self._nodes
        cfg = self._config
        seen: dict[str, tuple[str, dict[str, None]]] = {}
        services_at: dict[str, dict[str, None]] = {}
        for service in self._table.services():
            for endpoint in service.endpoints:
                services_at.setdefault(endpoint.address, {})[service.name] = None
                if endpoint.node:
                    _, addresses = seen.setdefault(endpoint.node.lower(), (endpoint.node, {}))
                    addresses[endpoint.address] = None
        nodes = {folded: _Node(name, tuple(sorted(addresses)), {})
                 for folded, (name, addresses) in seen.items()}
        nodes[cfg.node.lower()] = _Node(cfg.node, (cfg.node_address,), dict(cfg.node_meta))
        self._nodes = nodes
        self._services_at = {address: list(names) for address, names in services_at.items()}
        self._indexed_version = self._table.version
        return nodes
