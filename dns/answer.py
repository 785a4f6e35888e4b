"""The responder: reply bytes for query bytes, without sockets (sans-IO).

``Responder.answer(packet, max_udp)`` is the one call a transport makes per
message. A query seen before at the same route table version is answered from
the cache: a key read from the raw bytes, a dict lookup, and the query's ID put in
front of the packed reply, with no DNS message built. Everything else takes the
slow path: dnslib parses the packet, names.py says what the name asks, records.py
reads the table, truncate.py orders and fits the records, and the packed reply is
cached.

The protocol rules the slow path applies, beyond those of records.py:

- AA is set on every answer for our zones; RA only when recursors are configured.
- Out-of-zone names are REFUSED, or, with recursors and RD=1, handed back to the
  transport as ``FORWARD`` (an empty reply) to forward; in-zone names never are.
- Opcodes other than QUERY, and AXFR/IXFR, are NOTIMP; classes other than IN (and
  ANY) are REFUSED; an EDNS version above 0 is BADVERS (RFC 6891 6.1.3).
- A packet that parses only as far as its header gets a bare FORMERR header, as
  does one with other than one question or with several OPT records; one without
  a full header, or a response (QR=1), gets nothing.
- UDP answers fit the client's EDNS size capped by ``--udp-max``, or 512 bytes
  without EDNS; over TCP up to 64 KiB (see wire.size_limit and truncate.fit).
"""

from __future__ import annotations

import random

from dnslib import QTYPE, RCODE, DNSRecord

from consulate.dns.cache import FORWARD_ENTRY, AnswerCache, Entry, Forward, Rotation
from consulate.dns.config import DnsConfig
from consulate.dns.names import NameParser
from consulate.dns.records import RecordBuilder
from consulate.dns.truncate import fit, weighted_order
from consulate.dns.wire import (
    STREAM,
    edns_of,
    header_only,
    limit_of,
    query_key,
    readable,
    reply_to,
)
from consulate.proxy.table import RouteTable

# What ``answer`` returns for a query the recursors should answer.
FORWARD = b""
BADVERS = 16  # RFC 6891 extended rcode
_OPCODE_QUERY = 0
_ZONE_TRANSFERS = frozenset({QTYPE.AXFR, QTYPE.IXFR})
_CLASSES = frozenset({1, 255})  # IN, and ANY (RFC 1035 3.2.5)


class Responder:
    """Answers the queries of one agent's zones from its route table."""

    def __init__(self, table: RouteTable, config: DnsConfig,
                 rng: random.Random | None = None) -> None:
        self._table = table
        self._config = config
        self._names = NameParser(config.zones, config.datacenter)
        self._records = RecordBuilder(table, config)
        self._cache = AnswerCache()
        self._rng = rng or random.Random()
        self._recursion = bool(config.recursors)

    def answer(self, packet: bytes, max_udp: int) -> bytes | None:
        """The reply to ``packet``; ``FORWARD`` (empty) to send it to the recursors;
        None to send nothing. ``max_udp`` is the transport's cap on the reply size:
        ``--udp-max`` for UDP, ``wire.STREAM`` for TCP. No input makes it raise
        (tests/test_dns_fuzz.py); the server still turns a bug into SERVFAIL."""
        cache = self._cache
        if cache.version != self._table.version:
            cache.reset(self._table.version)
        key = query_key(packet, max_udp)
        if key is not None:
            entry = (cache.udp if max_udp < STREAM else cache.stream).get(key)
            if entry is not None:
                if type(entry) is bytes:
                    return packet[:2] + entry
                if type(entry) is Rotation:
                    return packet[:2] + entry.next()
                return FORWARD
        return self._miss(packet, max_udp, key)

    def _miss(self, packet: bytes, max_udp: int, key: bytes | None) -> bytes | None:
        try:
            query = DNSRecord.parse(packet)
        except Exception:  # dnslib raises more than DNSError on malformed input
            return header_only(packet, RCODE.FORMERR)
        if query.header.qr:
            return None  # a response, not a query: never answer those (no loops)
        if not readable(query):
            return header_only(packet, RCODE.FORMERR)
        entry = self._decide(query, max_udp)
        if key is not None:
            cache = self._cache
            cache.put(cache.udp if max_udp < STREAM else cache.stream, key, entry)
        if isinstance(entry, Forward):
            return FORWARD
        return packet[:2] + (entry.first() if isinstance(entry, Rotation) else entry)

    def _decide(self, query: DNSRecord, max_udp: int) -> Entry:
        """The cache entry for a parsed query: packed reply bytes after the ID."""
        opts = edns_of(query)
        if query.header.opcode != _OPCODE_QUERY:
            return self._error(query, RCODE.NOTIMP)
        if len(query.questions) != 1 or len(opts) > 1:
            return self._error(query, RCODE.FORMERR)
        if opts and (opts[0].ttl >> 16) & 0xFF:
            return self._error(query, BADVERS)
        question = query.q
        if question.qtype in _ZONE_TRANSFERS:
            return self._error(query, RCODE.NOTIMP)
        if question.qclass not in _CLASSES:
            return self._error(query, RCODE.REFUSED)
        lookup = self._names.parse(question.qname.label)
        answer = (self._records.build(lookup, question.qname, question.qtype)
                  if lookup is not None else None)
        if answer is None:
            if self._recursion and query.header.rd:
                return FORWARD_ENTRY
            return self._error(query, RCODE.REFUSED)
        reply = reply_to(query, rcode=answer.rcode, aa=True, ra=self._recursion,
                         udp_max=self._config.udp_max)
        reply.auth = answer.authority
        limit = limit_of(query, max_udp)
        units = answer.units
        if len(units) < 2:
            return fit(reply, units, limit)[2:]
        rng = self._rng
        return Rotation(lambda: fit(reply, weighted_order(units, rng), limit)[2:])

    def _error(self, query: DNSRecord, rcode: int) -> bytes:
        reply = reply_to(query, rcode=rcode, aa=False, ra=self._recursion,
                         udp_max=self._config.udp_max)
        return bytes(reply.pack())[2:]
