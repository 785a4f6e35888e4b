"""Forwarding out-of-zone queries to upstream resolvers (``--recursor``).

With recursors configured the agent can be a container's only resolver: names in
our zones are answered by the responder (never forwarded), everything else goes
upstream. Upstreams are tried in the order given, each for at most ``timeout``
seconds; when all fail the client gets SERVFAIL, never silence.

Each forwarded query goes out from a fresh socket (a random source port) with a
fresh random ID, and only a reply from that upstream with that ID is accepted, so
that an off-path attacker cannot slip in an answer (RFC 5452). Replies are relayed
as the upstream sent them, with the client's ID back and the AA bit cleared (the
agent is no authority for them). Over UDP they are held to the client's size limit
as the responder's answers are: an oversized reply becomes an empty one with TC=1,
and the client retries over TCP, which is forwarded over TCP.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence

from dnslib import RCODE, DNSRecord

from consulate.dns.wire import MIN_UDP, STREAM, edns_of, failure, limit_of

# In-flight forwards beyond this get SERVFAIL at once instead of another socket.
MAX_IN_FLIGHT = 1024


class UpstreamError(Exception):
    """One upstream did not give a usable reply."""


class _OneReply(asyncio.DatagramProtocol):
    """Resolves ``reply`` with the first datagram that carries ``query_id``."""

    def __init__(self, query_id: bytes, reply: asyncio.Future[bytes]) -> None:
        self._query_id = query_id
        self._reply = reply

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:2] == self._query_id and len(data) >= 12 and not self._reply.done():
            self._reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self._reply.done():  # e.g. ICMP port unreachable: nobody listens there
            self._reply.set_exception(UpstreamError(str(exc)))


class Recursor:
    """Forwards raw queries to a list of upstream resolvers."""

    def __init__(self, upstreams: Sequence[tuple[str, int]], timeout: float,
                 udp_max: int) -> None:
        self._upstreams = tuple(upstreams)
        self._timeout = timeout
        self._udp_max = udp_max
        self._in_flight = 0

    async def forward(self, packet: bytes, max_udp: int) -> bytes | None:
        """The reply to send to the client for ``packet`` (its own ID restored);
        ``max_udp`` is the transport's cap as for ``Responder.answer``."""
        if self._in_flight >= MAX_IN_FLIGHT or len(packet) < 12:
            return self._servfail(packet)
        self._in_flight += 1
        try:
            query_id = secrets.token_bytes(2)
            message = query_id + packet[2:]
            for upstream in self._upstreams:
                try:
                    async with asyncio.timeout(self._timeout):
                        if max_udp >= STREAM:
                            reply = await self._ask_tcp(upstream, message)
                        else:
                            reply = await self._ask_udp(upstream, message, query_id)
                except (UpstreamError, OSError, TimeoutError, asyncio.IncompleteReadError):
                    continue
                if len(reply) >= 12 and reply[:2] == query_id and reply[2] & 0x80:
                    # The client's ID back; AA cleared: we relay, we are no authority.
                    relayed = packet[:2] + bytes((reply[2] & ~0x04,)) + reply[3:]
                    return self._fitted(relayed, packet, max_udp)
            return self._servfail(packet)
        finally:
            self._in_flight -= 1

    async def _ask_udp(self, upstream: tuple[str, int], message: bytes,
                       query_id: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _OneReply(query_id, reply), remote_addr=upstream)
        try:
            transport.sendto(message)
            return await reply
        finally:
            transport.close()

    @staticmethod
    async def _ask_tcp(upstream: tuple[str, int], message: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*upstream)
        try:
            writer.write(len(message).to_bytes(2, "big") + message)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(size)
        finally:
            writer.close()

    def _fitted(self, reply: bytes, packet: bytes, max_udp: int) -> bytes | None:
        """The reply, or an empty TC=1 one when it exceeds what the client takes."""
        if len(reply) <= MIN_UDP or max_udp >= STREAM:
            return reply
        try:
            if len(reply) <= limit_of(DNSRecord.parse(packet), max_udp):
                return reply
            cut = DNSRecord.parse(reply)
        except Exception:  # dnslib raises more than DNSError on malformed input
            return self._servfail(packet)
        cut.rr, cut.auth, cut.ar = [], [], edns_of(cut)
        cut.header.tc = 1
        return bytes(cut.pack())

    def _servfail(self, packet: bytes) -> bytes | None:
        return failure(packet, RCODE.SERVFAIL, ra=True, udp_max=self._udp_max)
