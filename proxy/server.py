"""The transparent TCP proxy: accept, find the service from the original destination,
connect to an endpoint (retrying on distinct ones), then hand both sockets to a relay.

iptables REDIRECTs connections to VIPs onto this listener. The proxy accepts raw
sockets itself rather than through asyncio transports, so that a connection can
go to the native engine whole (both file descriptors) and the client's first
bytes wait in the kernel while the upstream connect is in progress. Routing
decisions stay here in Python; the bytes move in the relay.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from consulate.proxy.origdst import original_dst
from consulate.proxy.relay import PythonRelay
from consulate.proxy.stats import ProxyStats, ServiceCounters
from consulate.proxy.table import Endpoint, RouteTable

log = logging.getLogger("consulate.proxy")

DEFAULT_PORT = 10000  # Ambassadord's port
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_ATTEMPTS = 3
ACCEPTS_PER_WAKEUP = 64  # drain the backlog in batches, but let other work run


class NativeRelay(Protocol):
    """What the proxy needs of a byte-moving engine (``consulate.native.engine``)."""

    @property
    def notify_fd(self) -> int: ...

    def connect(self, conn_id: int, client: socket.socket,
                candidates: Sequence[tuple[str, int]], mark: int = 0) -> None: ...

    def poll(self) -> Sequence[_Result]: ...

    def close(self) -> Sequence[_Result]: ...


class _Result(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def bytes_a_to_b(self) -> int: ...

    @property
    def bytes_b_to_a(self) -> int: ...

    @property
    def reason(self) -> str: ...

    @property
    def error(self) -> int: ...

    @property
    def failed_mask(self) -> int: ...


@dataclass
class _Route:
    """A connection's routing decision: made once, in Python, whichever relay runs it."""

    peer: tuple[str, int]
    service: str
    counters: ServiceCounters
    candidates: list[Endpoint]


class TransparentProxy:
    """Routes REDIRECTed connections by VIP to the service's endpoints."""

    def __init__(
        self,
        table: RouteTable,
        *,
        engine: NativeRelay | None = None,
        mark: int = 0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        self.table = table
        self.stats = ProxyStats()
        self._engine = engine
        self._mark = mark
        self._connect_timeout = connect_timeout
        self._attempts = attempts
        self._listener: socket.socket | None = None
        self._ids = itertools.count(1)
        self._in_engine: dict[int, _Route] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._python = PythonRelay()

    @property
    def relay_name(self) -> str:
        return "native" if self._engine is not None else "python"

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(4096)
        listener.setblocking(False)
        self._listener = listener
        loop.add_reader(listener.fileno(), self._accept_ready)
        if self._engine is not None:
            loop.add_reader(self._engine.notify_fd, self._engine_results)
        log.info("event=listen component=proxy address=%s:%d relay=%s", host, port,
                 self.relay_name)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._listener is not None:
            loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._python.close()
        if self._engine is not None:
            loop.remove_reader(self._engine.notify_fd)
            self._account(self._engine.close())
            self._engine = None

    # -- accept ------------------------------------------------------------------

    def _accept_ready(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                client, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.warning("event=accept-failed error=%r", exc.strerror)
                return
            client.setblocking(False)
            route = self._route(client, peer)
            if route is None or self._hand_to_engine(client, route):
                continue
            task = loop.create_task(self._connect_and_relay(client, route))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _route(self, client: socket.socket, peer: tuple[str, int]) -> _Route | None:
        """Where this connection goes, or None after resetting it (logged, counted)."""
        try:
            vip, port = original_dst(client)
        except (OSError, ValueError) as exc:
            self.stats.unrouted += 1
            log.warning("event=reject client=%s:%d reason=no-original-destination error=%s",
                        *peer, exc)
            _reset(client)
            return None
        service = self.table.service_by_vip(vip)
        if service is None:
            self.stats.unrouted += 1
            log.warning("event=reject client=%s:%d destination=%s:%d reason=unknown-vip",
                        *peer, vip, port)
            _reset(client)
            return None
        counters = self.stats.of(service.name)
        counters.connections_total += 1
        candidates = service.balancer.candidates(service.endpoints, self._attempts)
        if not candidates:
            counters.rejected += 1
            log.warning("event=reject client=%s:%d service=%s vip=%s reason=no-endpoints",
                        *peer, service.name, vip)
            _reset(client)
            return None
        return _Route(peer, service.name, counters, candidates)

    def _hand_to_engine(self, client: socket.socket, route: _Route) -> bool:
        """Give the connection (connect attempts included) to the native engine."""
        if self._engine is None:
            return False
        conn_id = next(self._ids)
        try:
            self._engine.connect(conn_id, client,
                                 [(e.address, e.port) for e in route.candidates], self._mark)
        except OSError as exc:
            log.warning("event=native-declined errno=%s fallback=python",
                        errno.errorcode.get(exc.errno or 0, exc.errno))
            return False
        route.counters.connections_active += 1
        self._in_engine[conn_id] = route
        return True

    async def _connect_and_relay(self, client: socket.socket, route: _Route) -> None:
        try:
            for endpoint in route.candidates:
                upstream = await self._connect(endpoint, route.counters)
                if upstream is not None:
                    route.counters.connections_active += 1
                    await self._python.add(
                        client, upstream,
                        to_upstream=route.counters.count_to_upstream,
                        to_client=route.counters.count_to_client,
                        on_closed=lambda: _finished(route.counters),
                    )
                    return
        except BaseException:
            client.close()
            raise
        route.counters.rejected += 1
        log.warning("event=reject client=%s:%d service=%s reason=all-attempts-failed "
                    "attempts=%d", *route.peer, route.service, len(route.candidates))
        _reset(client)

    async def _connect(
        self, endpoint: Endpoint, counters: ServiceCounters
    ) -> socket.socket | None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self._mark:
                # The mark exempts our own upstream connections from REDIRECT.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self._mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            async with asyncio.timeout(self._connect_timeout):
                await loop.sock_connect(sock, (endpoint.address, endpoint.port))
            return sock
        except (OSError, TimeoutError) as exc:
            sock.close()
            counters.connect_failures += 1
            reason = "timeout" if isinstance(exc, TimeoutError) else exc.strerror or repr(exc)
            log.warning("event=connect-failed service=%s endpoint=%s address=%s:%d error=%r",
                        endpoint.service, endpoint.id, endpoint.address, endpoint.port, reason)
            return None
        except BaseException:
            sock.close()
            raise

    # -- native engine results ----------------------------------------------------

    def _engine_results(self) -> None:
        assert self._engine is not None
        self._account(self._engine.poll())

    def _account(self, results: Sequence[_Result]) -> None:
        for result in results:
            route = self._in_engine.pop(result.id, None)
            if route is None:
                continue
            counters = route.counters
            for i, endpoint in enumerate(route.candidates):
                if result.failed_mask & (1 << i):
                    counters.connect_failures += 1
                    log.warning("event=connect-failed service=%s endpoint=%s address=%s:%d",
                                endpoint.service, endpoint.id, endpoint.address, endpoint.port)
            if result.reason == "connect-failed":
                counters.rejected += 1
                log.warning("event=reject client=%s:%d service=%s reason=all-attempts-failed "
                            "attempts=%d error=%r", *route.peer, route.service,
                            len(route.candidates), os.strerror(result.error))
            counters.bytes_to_upstream += result.bytes_a_to_b
            counters.bytes_to_client += result.bytes_b_to_a
            _finished(counters)


def _reset(sock: socket.socket) -> None:
    """Close with RST: the client learns at once that nothing will answer."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _finished(counters: ServiceCounters) -> None:
    counters.connections_active -= 1
