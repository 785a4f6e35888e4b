"""The DNS responder's sockets: thin uvloop adapters around ``Responder.answer``.

Every address is served over UDP and TCP (RFC 7766: TCP is required, and it is
where a client goes after a TC=1 answer). Per datagram the UDP path is one call
to ``answer`` and one ``sendto``, so a batching loop (recvmmsg/sendmmsg) can call
``answer`` the same way. Forwarded queries are the only ones that wait, each in
its own task. An exception out of the responder (a bug) is logged, rate-limited,
and answered with SERVFAIL: no packet can stop the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

from dnslib import RCODE

from consulate.dns.answer import Responder
from consulate.dns.config import DnsConfig
from consulate.dns.recursor import Recursor
from consulate.dns.wire import STREAM, failure

log = logging.getLogger("consulate.dns")

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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport does not inherit asyncio.DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._sendto = self._transport.sendto

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = self._answer(data, self._udp_max)
        except Exception as exc:
            reply = self._server.failed(data, exc)
        if reply:
            self._sendto(reply, addr)
        elif reply is not None:
            self._server.forward_datagram(data, addr, self._transport)


class DnsServer:
    """Serves one Responder (and its recursors, if any) on UDP and TCP addresses."""

    def __init__(self, responder: Responder, config: DnsConfig) -> None:
        self.responder = responder
        self.config = config
        self._recursor = (Recursor(config.recursors, config.recursor_timeout, config.udp_max)
                          if config.recursors else None)
        self._transports: list[asyncio.DatagramTransport] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._streams = 0
        self._errors = 0
        self._last_error_log = -_ERROR_LOG_INTERVAL

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(host, port))
        self._transports.append(transport)
        self._servers.append(await asyncio.start_server(
            self._serve_stream, host, port, reuse_address=True))
        log.info("event=listen component=dns address=%s:%d proto=udp,tcp", host, port)

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
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

    def forward_datagram(self, packet: bytes, addr: tuple[str, int],
                         transport: asyncio.DatagramTransport) -> None:
        task = asyncio.get_running_loop().create_task(
            self._forward_datagram(packet, addr, transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward_datagram(self, packet: bytes, addr: tuple[str, int],
                                transport: asyncio.DatagramTransport) -> None:
        reply = await self._forward(packet, self.config.udp_max)
        if reply and not transport.is_closing():
            transport.sendto(reply, addr)

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
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._streams -= 1
            writer.close()
