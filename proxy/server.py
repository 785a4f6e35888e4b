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
import socket
import struct
from collections.abc import Callable, Sequence
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

    def add(self, conn_id: int, a: socket.socket, b: socket.socket) -> None: ...

    def poll(self) -> Sequence[_Result]: ...

    def close(self) -> Sequence[_Result]: ...


class _Result(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def bytes_a_to_b(self) -> int: ...

    @property
    def bytes_b_to_a(self) -> int: ...


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
        self._in_engine: dict[int, ServiceCounters] = {}
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
            task = loop.create_task(self._route(client, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _route(self, client: socket.socket, peer: tuple[str, int]) -> None:
        try:
            await self._route_or_reject(client, peer)
        except BaseException:
            client.close()
            raise

    async def _route_or_reject(self, client: socket.socket, peer: tuple[str, int]) -> None:
        try:
            vip, port = original_dst(client)
        except (OSError, ValueError) as exc:
            self.stats.unrouted += 1
            log.warning("event=reject client=%s:%d reason=no-original-destination error=%s",
                        *peer, exc)
            return _reset(client)
        service = self.table.service_by_vip(vip)
        if service is None:
            self.stats.unrouted += 1
            log.warning("event=reject client=%s:%d destination=%s:%d reason=unknown-vip",
                        *peer, vip, port)
            return _reset(client)
        counters = self.stats.of(service.name)
        counters.connections_total += 1
        candidates = service.balancer.candidates(service.endpoints, self._attempts)
        if not candidates:
            counters.rejected += 1
            log.warning("event=reject client=%s:%d service=%s vip=%s reason=no-endpoints",
                        *peer, service.name, vip)
            return _reset(client)
        for endpoint in candidates:
            upstream = await self._connect(endpoint, counters)
            if upstream is not None:
                counters.connections_active += 1
                await self._relay(client, upstream, counters)
                return None
        counters.rejected += 1
        log.warning("event=reject client=%s:%d service=%s reason=all-attempts-failed "
                    "attempts=%d", *peer, service.name, len(candidates))
        return _reset(client)

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

    # -- relay -------------------------------------------------------------------

    async def _relay(self, client: socket.socket, upstream: socket.socket,
                     counters: ServiceCounters) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._engine is not None:
            conn_id = next(self._ids)
            try:
                self._engine.add(conn_id, client, upstream)
            except OSError as exc:
                log.warning("event=native-declined errno=%s fallback=python",
                            errno.errorcode.get(exc.errno or 0, exc.errno))
            else:
                self._in_engine[conn_id] = counters
                return
        await self._python.add(
            client, upstream,
            to_upstream=_adder(counters, "bytes_to_upstream"),
            to_client=_adder(counters, "bytes_to_client"),
            on_closed=lambda: _finished(counters),
        )

    def _engine_results(self) -> None:
        assert self._engine is not None
        self._account(self._engine.poll())

    def _account(self, results: Sequence[_Result]) -> None:
        for result in results:
            counters = self._in_engine.pop(result.id, None)
            if counters is not None:
                counters.bytes_to_upstream += result.bytes_a_to_b
                counters.bytes_to_client += result.bytes_b_to_a
                _finished(counters)


def _reset(sock: socket.socket) -> None:
    """Close with RST: the client learns at once that nothing will answer."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _finished(counters: ServiceCounters) -> None:
    counters.connections_active -= 1


def _adder(counters: ServiceCounters, field: str) -> Callable[[int], None]:
    def add(n: int) -> None:
        setattr(counters, field, getattr(counters, field) + n)

    return add
