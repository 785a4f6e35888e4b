"""The transparent TCP proxy: accept, find the service from the original destination,
connect to an endpoint (retrying on distinct ones), then relay the bytes both ways.

iptables REDIRECTs connections to VIPs onto this listener. With the native engine
the per-connection path runs entirely in C: the proxy lends the engine its
listening socket and publishes, at every RouteTable change, the table the engine
routes by (VIP -> service id -> endpoints); Python keeps the decisions (which
endpoints, in which order of preference) and hears back only what it must log.
With the Python relay, the proxy accepts raw sockets itself, so that the client's
first bytes wait in the kernel while the upstream connect is in progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from consulate.native.model import EngineRoute, RelayResult
from consulate.proxy.origdst import original_dst
from consulate.proxy.relay import PythonRelay
from consulate.proxy.stats import ProxyStats, ServiceCounters
from consulate.proxy.table import Endpoint, RouteTable

if TYPE_CHECKING:
    from consulate.native.engine import SpliceEngine

log = logging.getLogger("consulate.proxy")

DEFAULT_PORT = 10000  # Ambassadord's port
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_ATTEMPTS = 3
ACCEPTS_PER_WAKEUP = 64  # drain the backlog in batches, but let other work run


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
        engine: SpliceEngine | None = None,
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
        self._service_ids: dict[str, int] = {}  # the engine's counters are indexed by these
        self._unsubscribe: Callable[[], None] | None = None
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
        if self._engine is None:
            loop.add_reader(listener.fileno(), self._accept_ready)
        else:
            loop.add_reader(self._engine.notify_fd, self._engine_results)
            self._publish_routes(self.table.version)
            self._unsubscribe = self.table.subscribe(self._publish_routes)
            self._engine.listen(listener, mark=self._mark, attempts=self._attempts)
        log.info("event=listen component=proxy address=%s:%d relay=%s", host, port,
                 self.relay_name)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._listener is not None:
            if self._engine is None:
                loop.remove_reader(self._listener.fileno())
            else:
                self._engine.unlisten()
            self._listener.close()
            self._listener = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._python.close()
        if self._engine is not None:
            loop.remove_reader(self._engine.notify_fd)
            self._log_engine_reports(self._engine.poll())
            self._merge_engine_counters()
            self._engine.close()
            self._engine = None

    def stats_snapshot(self) -> dict[str, object]:
        """The proxy's counters, whichever relay counted them."""
        if self._engine is not None:
            self._merge_engine_counters()
        return self.stats.snapshot()

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
            if route is None:
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

    # -- native engine: routes out, counters and reports in -----------------------

    def _publish_routes(self, _version: int) -> None:
        """Give the engine the table it routes by, rebuilt from the RouteTable."""
        assert self._engine is not None
        routes = []
        for service in self.table.services():
            service_id = self._service_ids.setdefault(service.name, len(self._service_ids))
            routes.append(EngineRoute(service_id, str(service.vip),
                                      [(e.address, e.port) for e in service.endpoints]))
        self._engine.set_routes(routes)

    def _merge_engine_counters(self) -> None:
        assert self._engine is not None
        names = sorted(self._service_ids, key=self._service_ids.__getitem__)
        for name, counters in zip(names, self._engine.service_counters(len(names)),
                                  strict=False):
            self.stats.services[name] = ServiceCounters(**asdict(counters))
        self.stats.unrouted = self._engine.stats().unrouted

    def _engine_results(self) -> None:
        assert self._engine is not None
        self._log_engine_reports(self._engine.poll())

    def _endpoint_id(self, service_name: str, address: str, port: int) -> str:
        """The id of the endpoint the engine tried ("?" if it has left the table since)."""
        service = self.table.service(service_name)
        for endpoint in service.endpoints if service is not None else ():
            if (endpoint.address, endpoint.port) == (address, port):
                return endpoint.id
        return "?"

    def _log_engine_reports(self, results: Sequence[RelayResult]) -> None:
        """Log what the engine refused or failed to connect, as the Python path does."""
        names = {service_id: name for name, service_id in self._service_ids.items()}
        for result in results:
            client, (vip, port) = result.client, result.destination
            name = names.get(result.service, "?")
            if result.reason == "unrouted":
                reason = "unknown-vip" if result.error == 0 else "no-original-destination"
                log.warning("event=reject client=%s:%d destination=%s:%d reason=%s", *client,
                            vip, port, reason)
            elif result.reason == "no-endpoints":
                log.warning("event=reject client=%s:%d service=%s vip=%s reason=no-endpoints",
                            *client, name, vip)
            elif result.reason == "accept-failed":
                log.warning("event=accept-failed error=%r", os.strerror(result.error))
            for i, (address, endpoint_port) in enumerate(result.candidates):
                if result.failed_mask & (1 << i):
                    log.warning("event=connect-failed service=%s endpoint=%s address=%s:%d",
                                name, self._endpoint_id(name, address, endpoint_port),
                                address, endpoint_port)
            if result.reason == "connect-failed":
                log.warning("event=reject client=%s:%d service=%s reason=all-attempts-failed "
                            "attempts=%d error=%r", *client, name, len(result.candidates),
                            os.strerror(result.error))


def _reset(sock: socket.socket) -> None:
    """Close with RST: the client learns at once that nothing will answer."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _finished(counters: ServiceCounters) -> None:
    counters.connections_active -= 1
