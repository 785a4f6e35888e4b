"""Reading queries and writing reply skeletons: the byte-level rules every answer shares.

``query_key`` is the hot path's only parsing: it checks that a packet is one plain
query and returns the bytes that identify its answer, without building any object.
Everything else here works on dnslib records and runs only when the cache misses.
"""

from __future__ import annotations

from dnslib import EDNS0, QTYPE, DNSHeader, DNSRecord

# Passed as ``max_udp`` by a stream (TCP) transport: answers may use a whole
# 64 KiB message (RFC 1035 4.2.2) whatever the client's EDNS size says.
STREAM = 65535
# RFC 1035 4.2.1: without EDNS a UDP answer is at most 512 bytes, and RFC 6891
# 6.2.5: an EDNS size below 512 is treated as 512.
MIN_UDP = 512
MAX_LABEL = 63
MAX_NAME = 255
# EDNS sizes between 512 and the server's cap are rounded down to a multiple of
# this, so clients that each send a slightly different size share cache entries.
_SIZE_STEP = 256

# QDCOUNT 1, ANCOUNT 0, NSCOUNT 0, and ARCOUNT 0 or 1 (the OPT record)
_COUNTS_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_COUNTS_EDNS = b"\x00\x01\x00\x00\x00\x00\x00\x01"
_OPT_TYPE = b"\x00\x29"
_BARE_OPT_HEAD = b"\x00" + _OPT_TYPE  # root owner name, TYPE OPT


def size_limit(edns_size: int | None, max_udp: int) -> int:
    """The most bytes an answer may take: 512 without EDNS, else the client's size
    capped by ``max_udp`` (rounded down to a size step), or a full message on TCP."""
    if max_udp >= STREAM:
        return STREAM
    if edns_size is None or edns_size <= MIN_UDP:
        return MIN_UDP
    if edns_size >= max_udp:
        return max_udp
    return max(MIN_UDP, edns_size - edns_size % _SIZE_STEP)


def query_key(packet: bytes, max_udp: int) -> bytes | None:
    """The cache key of a plain query, or None when only the full parser can judge it.

    A plain query has QR=0, opcode QUERY, one question, no answer or authority
    records, and either nothing or one EDNS version 0 OPT record after the question.
    The key is everything after the ID that shapes the answer (header flags, the
    question exactly as sent, so 0x20 case is echoed) plus, with EDNS over UDP, the
    size limit; EDNS options such as cookies are left out, since no answer depends
    on them. Keys are unique per transport only: UDP and TCP need a table each.
    """
    if len(packet) < 17 or packet[2] & 0xF8:
        return None  # a response or another opcode
    counts = packet[4:12]
    if counts == _COUNTS_PLAIN:
        return packet[2:]
    if counts != _COUNTS_EDNS:
        return None  # not one bare question
    # OPT: root owner, TYPE 41, CLASS = UDP size, TTL = ext-rcode, version, flags, RDLEN
    size = len(packet)
    if (packet[size - 11:size - 8] == _BARE_OPT_HEAD and packet[size - 5] == 0
            and packet[size - 2:] == b"\x00\x00"):
        # The usual OPT without options closes the packet: no need to walk the name.
        # An RR takes at least these 11 bytes, so the question always lies in the
        # part of the packet the key copies.
        end = size - 11
        edns_size = packet[size - 8] << 8 | packet[size - 7]
    else:
        found = question_end(packet)  # options follow (a cookie, say): find the OPT
        if found is None:
            return None
        end = found
        opt = packet[end:]
        if (len(opt) < 11 or opt[0] != 0 or opt[1:3] != _OPT_TYPE or opt[6] != 0
                or 11 + int.from_bytes(opt[9:11], "big") != len(opt)):
            return None
        edns_size = opt[3] << 8 | opt[4]
    if max_udp >= STREAM:
        return packet[2:end]
    return packet[2:end] + size_limit(edns_size, max_udp).to_bytes(2, "big")


def question_end(packet: bytes) -> int | None:
    """Where the single question ends (after QTYPE and QCLASS), or None if unreadable."""
    at, size = 12, len(packet)
    while at < size:
        length = packet[at]
        if length == 0:
            end = at + 5
            return end if end <= size else None
        if length > 63:
            return None  # a compression pointer or a reserved label type
        at += length + 1
    return None


def readable(query: DNSRecord) -> bool:
    """False when a question name breaks DNS's limits (labels of at most 63 octets,
    names of at most 255, RFC 1035 2.3.4): dnslib parses such names (it reads the
    reserved label types 0x40-0xBF as lengths) but cannot pack them into a reply."""
    for question in query.questions:
        labels = question.qname.label
        if (any(len(label) > MAX_LABEL for label in labels)
                or sum(len(label) + 1 for label in labels) + 1 > MAX_NAME):
            return False
    return True


def edns_of(query: DNSRecord) -> list[EDNS0]:
    """The query's OPT pseudo-records (more than one is a FORMERR, RFC 6891 6.1.1)."""
    return [rr for rr in query.ar if rr.rtype == QTYPE.OPT]


def limit_of(query: DNSRecord, max_udp: int) -> int:
    """``size_limit`` for a parsed query, from its OPT record if it has one."""
    opts = edns_of(query)
    return size_limit(opts[0].rclass if opts else None, max_udp)


def reply_to(query: DNSRecord, *, rcode: int, aa: bool, ra: bool, udp_max: int) -> DNSRecord:
    """A reply skeleton: the query's ID, opcode, RD and CD (RFC 4035 3.1.6), its
    question, and an OPT record advertising ``udp_max`` when the query had EDNS
    (RFC 6891 7). Extended rcodes (above 15) go into the OPT record."""
    asked = query.header
    header = DNSHeader(id=asked.id, qr=1, opcode=asked.opcode, aa=int(aa), rd=asked.rd,
                       cd=asked.cd, ra=int(ra), rcode=rcode & 0xF)
    reply = DNSRecord(header, q=query.q) if query.questions else DNSRecord(header)
    if edns_of(query):
        reply.add_ar(EDNS0(udp_len=udp_max, ext_rcode=rcode >> 4))
    return reply


def header_only(packet: bytes, rcode: int) -> bytes | None:
    """A bare header reply for a packet whose question cannot be read, keeping its ID,
    opcode and RD; None when there is not even a header, or it is a response (QR=1:
    answering responses could loop between two servers)."""
    if len(packet) < 12 or packet[2] & 0x80:
        return None
    flags = 0x8000 | (packet[2] & 0x79) << 8 | rcode
    return packet[:2] + flags.to_bytes(2, "big") + bytes(8)


def failure(packet: bytes, rcode: int, *, ra: bool, udp_max: int) -> bytes | None:
    """An error reply (SERVFAIL, REFUSED...) echoing the question when it can be read."""
    try:
        query = DNSRecord.parse(packet)
    except Exception:  # dnslib raises more than DNSError on malformed input
        return header_only(packet, rcode)
    if query.header.qr:
        return None
    if not readable(query):
        return header_only(packet, rcode)
    return bytes(reply_to(query, rcode=rcode, aa=False, ra=ra, udp_max=udp_max).pack())
