"""The DNS responder's sockets: thin uvloop adapters around ``Responder.answer``.

Every address is served over UDP and TCP (RFC 7766: TCP is required, and it is
where a client goes after a TC=1 answer). With the native module, UDP is read
and answered in batches: one recvmmsg(2) takes every waiting query, ``answer``
runs on each, and one sendmmsg(2) sends the replies, so a busy server pays two
syscalls and one event-loop wakeup per batch instead of per query. Without it,
a DatagramProtocol makes one ``answer`` call and one ``sendto`` per datagram.
Forwarded queries are the only ones that wait, each in its own task. An
exception out of the responder (a bug) is logged, rate-limited, and answered
with SERVFAIL: no packet can stop the server. With ``rate_limit`` set, UDP
queries pass a per-client-address limit first (dns/ratelimit.py says what
happens over it, and why TCP is not limited).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from dnslib import RCODE

from consulate import native
from consulate.dns.answer import Responder
from consulate.dns.config import DnsConfig
from consulate.dns.ratelimit import (
    ANSWER,
    QUIET_SECONDS,
    SLIP,
    ResponseRateLimit,
    over_line,
    slip_reply,
    started_line,
)
from consulate.dns.recursor import Recursor
from consulate.dns.wire import STREAM, failure

if TYPE_CHECKING:
    from consulate.native.udp import UdpBatch

log = logging.getLogger("consulate.dns")

Send = Callable[[bytes, tuple[str, int]], None]

TCP_IDLE_TIMEOUT = 10.0  # RFC 7766 6.2.3: servers close idle connections
MAX_TCP_CLIENTS = 256
_ERROR_LOG_INTERVAL = 10.0


class _UdpProtocol(asyncio.DatagramProtocol):
    """Per datagram: one ``answer`` call and one ``sendto`` (the hot path)."""

    _transport: asyncio.DatagramTransport
    _sendto: Callable[[bytes, tuple[str, int]], None]

    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._answer = server.responder.answer
        self._udp_max = server.config.udp_max
        self._rcodes = server.rcodes
        self._limit = server.rate_limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport does not inherit asyncio.DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._sendto = self._transport.sendto

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        limit = self._limit
        if limit is not None:
            verdict = limit.check(addr[0], time.monotonic())
            if verdict != ANSWER:
                slipped = self._server.over_limit(data, verdict)
                if slipped is not None:
                    self._sendto(slipped, addr)
                return
        try:
            reply = self._answer(data, self._udp_max)
        except Exception as exc:
            reply = self._server.failed(data, exc)
        if reply:
            self._rcodes[reply[3] & 0x0F] += 1
            self._sendto(reply, addr)
        elif reply is not None:
            self._server.forward_datagram(data, addr, self._sendto)


class _BatchedUdp:
    """A UDP socket read and answered a batch at a time (the native module's
    recvmmsg/sendmmsg): the same ``answer`` per query, far fewer syscalls."""

    # Batches per wakeup: under load the loop still gets to its other work
    # (TCP clients, the registry) between rounds.
    BATCHES_PER_WAKEUP = 8

    def __init__(self, server: DnsServer, sock: socket.socket, batch: UdpBatch) -> None:
        self._server = server
        self._sock = sock
        self._batch = batch
        self._answer = server.responder.answer
        self._udp_max = server.config.udp_max

    def readable(self) -> None:
        answer, udp_max, batch = self._answer, self._udp_max, self._batch
        rcodes, limit = self._server.rcodes, self._server.rate_limit
        for _ in range(self.BATCHES_PER_WAKEUP):
            try:
                queries = batch.receive()
            except OSError as exc:  # ECONNREFUSED from an ICMP error and such: go on
                log.debug("event=udp-receive-error error=%r", exc)
                return
            if not queries:
                return
            replies = []
            for slot, query in enumerate(queries):
                if not query:
                    continue  # longer than a slot: no DNS query is, drop it
                if limit is not None:
                    verdict = limit.check(batch.peer(slot)[0], time.monotonic())
                    if verdict != ANSWER:
                        slipped = self._server.over_limit(query, verdict)
                        if slipped is not None:
                            replies.append((slot, slipped))
                        continue
                try:
                    reply = answer(query, udp_max)
                except Exception as exc:
                    reply = self._server.failed(query, exc)
                if reply:
                    rcodes[reply[3] & 0x0F] += 1
                    replies.append((slot, reply))
                elif reply is not None:
                    self._server.forward_datagram(query, batch.peer(slot), self._send_one)
            batch.send(replies)

    def _send_one(self, reply: bytes, addr: tuple[str, int]) -> None:
        try:
            self._sock.sendto(reply, addr)
        except OSError as exc:  # a full buffer or a gone client: UDP may drop
            log.debug("event=udp-send-error error=%r", exc)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._batch.close()
        self._sock.close()


class DnsServer:
    """Serves one Responder (and its recursors, if any) on UDP and TCP addresses."""

    def __init__(self, responder: Responder, config: DnsConfig) -> None:
        self.responder = responder
        self.config = config
        self._recursor = (Recursor(config.recursors, config.recursor_timeout, config.udp_max)
                          if config.recursors else None)
        self._transports: list[asyncio.DatagramTransport] = []
        self._batched: list[_BatchedUdp] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._streams = 0
        self._errors = 0
        self._last_error_log = -_ERROR_LOG_INTERVAL
        # Replies sent, by the header's 4-bit RCODE (RFC 1035 4.1.1), for /metrics:
        # counted where each reply leaves, a list index being the cheapest count.
        self.rcodes = [0] * 16
        self.rate_limit = (ResponseRateLimit(config.rate_limit) if config.rate_limit > 0
                           else None)
        self._episode_timer: asyncio.TimerHandle | None = None

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        if native.capabilities().extension:
            self._listen_batched(loop, host, port)
        else:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, port))
            self._transports.append(transport)
        self._servers.append(await asyncio.start_server(
            self._serve_stream, host, port, reuse_address=True))
        log.info("event=listen component=dns address=%s:%d proto=udp,tcp", host, port)

    def _listen_batched(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        from consulate.native.udp import UdpBatch

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
            sock.setblocking(False)
            reader = _BatchedUdp(self, sock, UdpBatch(sock))
        except BaseException:
            sock.close()
            raise
        loop.add_reader(sock.fileno(), reader.readable)
        self._batched.append(reader)

    @property
    def batched(self) -> bool:
        """UDP is served in recvmmsg/sendmmsg batches (the native module is there)."""
        return bool(self._batched)

    def close(self) -> None:
        for reader in self._batched:
            reader.close()
        self._batched.clear()
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        if self._episode_timer is not None:
            self._episode_timer.cancel()
            self._episode_timer = None
        self._transports.clear()
        self._servers.clear()

    def failed(self, packet: bytes, exc: Exception) -> bytes | None:
        """SERVFAIL for a query the responder raised on; logs at most every 10 s."""
        self._errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_INTERVAL:
            log.error("event=dns-error errors=%d error=%r", self._errors, exc, exc_info=exc)
            self._last_error_log, self._errors = now, 0
        try:
            return failure(packet, RCODE.SERVFAIL, ra=self._recursor is not None,
                           udp_max=self.config.udp_max)
        except Exception:
            return None

    def over_limit(self, packet: bytes, verdict: str) -> bytes | None:
        """A UDP query over the rate limit: the TC=1 reply to send when it slips,
        else None (dropped). Logs the first of an episode."""
        limit = self.rate_limit
        assert limit is not None
        episode = limit.episode_started()
        if episode is not None:
            log.warning(started_line(episode))
            if self._episode_timer is None:
                self._episode_timer = asyncio.get_running_loop().call_later(
                    QUIET_SECONDS, self._episode_check)
        if verdict != SLIP:
            return None
        reply = slip_reply(packet)
        if reply is not None:
            self.rcodes[RCODE.NOERROR] += 1
        return reply

    def _episode_check(self) -> None:
        """Log the end of a rate-limit episode once it has been quiet long enough."""
        self._episode_timer = None
        limit = self.rate_limit
        if limit is None or limit.episode is None:
            return
        now = time.monotonic()
        episode = limit.episode_over(now)
        if episode is not None:
            log.warning(over_line(episode))
            return
        self._episode_timer = asyncio.get_running_loop().call_later(
            max(limit.episode.last + QUIET_SECONDS - now, 0.0) + 0.01, self._episode_check)

    def forward_datagram(self, packet: bytes, addr: tuple[str, int], send: Send) -> None:
        task = asyncio.get_running_loop().create_task(
            self._forward_datagram(packet, addr, send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward_datagram(self, packet: bytes, addr: tuple[str, int],
                                send: Send) -> None:
        reply = await self._forward(packet, self.config.udp_max)
        if reply and (self._batched or self._transports):  # not closed meanwhile
            self.rcodes[reply[3] & 0x0F] += 1
            send(reply, addr)

    async def _forward(self, packet: bytes, max_udp: int) -> bytes | None:
        if self._recursor is None:  # the responder forwards only with recursors
            return None
        try:
            return await self._recursor.forward(packet, max_udp)
        except Exception as exc:
            return self.failed(packet, exc)

    async def _serve_stream(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        """RFC 1035 4.2.2 / RFC 7766: 2-byte length-prefixed messages, answered in
        order, until the client closes or stays idle for ``TCP_IDLE_TIMEOUT``."""
        if self._streams >= MAX_TCP_CLIENTS:
            writer.close()
            return
        self._streams += 1
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    packet = await reader.readexactly(size)
                try:
                    reply = self.responder.answer(packet, STREAM)
                except Exception as exc:
                    reply = self.failed(packet, exc)
                if reply is not None and not reply:
                    reply = await self._forward(packet, STREAM)
                if reply:
                    self.rcodes[reply[3] & 0x0F] += 1
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._streams -= 1
            writer.close()
