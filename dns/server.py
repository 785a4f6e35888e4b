"""The DNS responder's sockets: a thin uvloop UDP adapter around ``Responder``."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from consulate.dns.answer import Responder

log = logging.getLogger("consulate.dns")


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, responder: Responder) -> None:
        self._responder = responder
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport does not inherit asyncio.DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self._responder.respond(data)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)


class DnsServer:
    """Serves one Responder on any number of UDP addresses."""

    def __init__(self, responder: Responder) -> None:
        self._responder = responder
        self._transports: list[asyncio.DatagramTransport] = []

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self._responder), local_addr=(host, port)
        )
        self._transports.append(transport)
        log.info("event=listen component=dns address=%s:%d proto=udp", host, port)

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        self._transports.clear()
