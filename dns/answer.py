"""Answers to DNS queries for the mesh domain, without sockets (sans-IO).

This first responder knows one name form, ``<service>.service.<domain>``, which
answers A with the service's VIP. The rules it follows already are the RFC's:
authoritative answers (AA) with no recursion offered (RA clear, RFC 1035 4.1.1),
NXDOMAIN and NODATA carrying the zone's SOA for negative caching (RFC 2308 3),
REFUSED outside the zone, FORMERR for a packet that parses only as far as its
header, and silence for one that does not even have a header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from dnslib import QTYPE, RCODE, RR, SOA, A, DNSError, DNSHeader, DNSLabel, DNSRecord
from dnslib.buffer import Buffer

DEFAULT_DOMAIN = "consul."
# Consul's default: service answers are not cached, so a moved VIP or endpoint is
# seen at once.
ANSWER_TTL = 0
_OPCODE_QUERY = 0

VipLookup = Callable[[str], ipaddress.IPv4Address | None]


class Responder:
    """Builds the reply packet for a query packet, from a VIP lookup by service name."""

    def __init__(self, lookup: VipLookup, domain: str = DEFAULT_DOMAIN) -> None:
        self._lookup = lookup
        self._zone = DNSLabel(domain)
        self._soa = RR(
            self._zone,
            QTYPE.SOA,
            ttl=ANSWER_TTL,
            rdata=SOA(
                DNSLabel(f"ns.{domain}"),
                DNSLabel(f"hostmaster.{domain}"),
                (1, 3600, 600, 86400, ANSWER_TTL),
            ),
        )

    def respond(self, packet: bytes) -> bytes | None:
        """The reply to send, or None when the packet is not worth answering."""
        try:
            query = DNSRecord.parse(packet)
        except DNSError:
            return self._format_error(packet)
        if query.header.qr:
            return None  # a response, not a query: never answer those (no loops)
        reply = DNSRecord(
            DNSHeader(id=query.header.id, qr=1, aa=1, ra=0, rd=query.header.rd,
                      opcode=query.header.opcode),
            q=query.q,
        )
        if query.header.opcode != _OPCODE_QUERY:
            reply.header.rcode = RCODE.NOTIMP
            reply.header.aa = 0
            return bytes(reply.pack())
        if len(query.questions) != 1:
            reply.header.rcode = RCODE.FORMERR
            reply.header.aa = 0
            return bytes(reply.pack())
        self._answer(query.q.qname, query.q.qtype, reply)
        return bytes(reply.pack())

    def _answer(self, qname: DNSLabel, qtype: int, reply: DNSRecord) -> None:
        if not qname.matchSuffix(self._zone):
            reply.header.rcode = RCODE.REFUSED
            reply.header.aa = 0
            return
        labels = [label.decode("ascii", "replace").lower() for label in qname.stripSuffix(
            self._zone).label]
        vip = self._lookup(labels[0]) if len(labels) == 2 and labels[1] == "service" else None
        if vip is None:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self._soa)
        elif qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(qname, QTYPE.A, ttl=ANSWER_TTL, rdata=A(str(vip))))
        else:
            reply.add_auth(self._soa)  # NODATA: the name exists, not with this type

    @staticmethod
    def _format_error(packet: bytes) -> bytes | None:
        try:
            header = DNSHeader.parse(Buffer(packet))
        except DNSError:
            return None
        if header.qr:
            return None
        return bytes(DNSRecord(
            DNSHeader(id=header.id, qr=1, rd=header.rd, rcode=RCODE.FORMERR,
                      opcode=header.opcode)
        ).pack())
