"""The transparent TCP proxy: accept, find the service from the original destination,
connect to an endpoint (retrying on distinct ones), then relay.

iptables REDIRECTs connections to VIPs onto this listener. Each accepted
connection stops reading after its first bytes until an upstream is connected,
so what the client sends early waits in the kernel, not in the agent.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from consulate.proxy.origdst import original_dst
from consulate.proxy.relay import RelaySide
from consulate.proxy.stats import ProxyStats, ServiceCounters
from consulate.proxy.table import Endpoint, RouteTable

log = logging.getLogger("consulate.proxy")

DEFAULT_PORT = 10000  # Ambassadord's port
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_ATTEMPTS = 3


class _ClientSide(RelaySide):
    """The accepted connection: starts routing as soon as it is made."""

    def __init__(self, proxy: TransparentProxy) -> None:
        super().__init__(on_bytes=self._count)
        self._proxy = proxy
        self._task: asyncio.Task[None] | None = None
        self.counters: ServiceCounters | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._task = asyncio.get_running_loop().create_task(self._proxy.route(self))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left while we were still connecting
        if self.counters is not None and self.peer is not None:
            self.counters.connections_active -= 1

    def _count(self, n: int) -> None:
        if self.counters is not None:
            self.counters.bytes_to_upstream += n


class TransparentProxy:
    """Routes REDIRECTed connections by VIP to the service's endpoints."""

    def __init__(
        self,
        table: RouteTable,
        *,
        mark: int = 0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        self.table = table
        self.stats = ProxyStats()
        self._mark = mark
        self._connect_timeout = connect_timeout
        self._attempts = attempts
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ClientSide(self), host, port, reuse_address=True, backlog=4096
        )
        log.info("event=listen component=proxy address=%s:%d", host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def route(self, client: _ClientSide) -> None:
        transport = client.transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        try:
            vip, port = original_dst(transport.get_extra_info("socket"))
        except (OSError, ValueError) as exc:
            self.stats.unrouted += 1
            log.warning("event=reject client=%s reason=no-original-destination error=%s",
                        _fmt(peer), exc)
            transport.abort()
            return
        service = self.table.service_by_vip(vip)
        if service is None:
            self.stats.unrouted += 1
            log.warning("event=reject client=%s destination=%s:%d reason=unknown-vip",
                        _fmt(peer), vip, port)
            transport.abort()
            return
        counters = self.stats.of(service.name)
        counters.connections_total += 1
        candidates = service.balancer.candidates(service.endpoints, self._attempts)
        if not candidates:
            counters.rejected += 1
            log.warning("event=reject client=%s service=%s vip=%s reason=no-endpoints",
                        _fmt(peer), service.name, vip)
            transport.abort()
            return
        client.counters = counters
        for endpoint in candidates:
            if await self._connect(client, endpoint, counters):
                counters.connections_active += 1
                return
        counters.rejected += 1
        log.warning("event=reject client=%s service=%s reason=all-attempts-failed attempts=%d",
                    _fmt(peer), service.name, len(candidates))
        transport.abort()

    async def _connect(
        self, client: _ClientSide, endpoint: Endpoint, counters: ServiceCounters
    ) -> bool:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self._mark:
                # The mark exempts our own upstream connections from REDIRECT.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self._mark)
            sock.setblocking(False)
            await asyncio.wait_for(
                loop.sock_connect(sock, (endpoint.address, endpoint.port)),
                self._connect_timeout,
            )

            def upstream_side() -> RelaySide:
                def count(n: int) -> None:
                    counters.bytes_to_client += n

                return RelaySide(on_bytes=count, peer=client)

            await loop.create_connection(upstream_side, sock=sock)
            return True
        except (OSError, TimeoutError) as exc:
            sock.close()
            counters.connect_failures += 1
            reason = "timeout" if isinstance(exc, TimeoutError) else exc.strerror or repr(exc)
            log.warning("event=connect-failed service=%s endpoint=%s address=%s:%d error=%r",
                        endpoint.service, endpoint.id, endpoint.address, endpoint.port, reason)
            return False
        except BaseException:
            sock.close()
            raise


def _fmt(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
