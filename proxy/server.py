"""The transparent TCP proxy: accept, find the service from the original destination,
connect to an endpoint (retrying on distinct ones), then relay the bytes both ways.

Connections to VIPs reach this listener in one of two ways (``--tcp-intercept``): a BPF
sk_lookup program hands them to it unchanged, the VIP being the accepted socket's
own address (proxy/sklookup.py), or iptables REDIRECTs them, the VIP then read
back with SO_ORIGINAL_DST (proxy/origdst.py). With the native engine
the per-connection path runs entirely in C: the proxy lends the engine its
listening socket and publishes, at every RouteTable change, the table the engine
routes by (VIP -> service id -> endpoints); Python keeps the decisions (which
endpoints, in which order of preference) and hears back only what it must log
(proxy/engine_link.py).
With the Python relay, uvloop accepts and makes the client's transport; the
proxy routes it in ``connection_made`` and joins the upstream once connected (what
the client sends meanwhile waits in the relay, its reading paused).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from consulate.proxy import proxy_log, sklookup
from consulate.proxy.engine_link import EngineLink
from consulate.proxy.limits import (
    MAX_CONNECTIONS,
    MAX_PENDING_PER_SERVICE,
    ConnectionLimits,
    LimitEpisodes,
)
from consulate.proxy.origdst import original_dst
from consulate.proxy.outlier import OutlierPolicy
from consulate.proxy.pool import ServicePool
from consulate.proxy.relay import ClientSide, PythonRelay, RelaySide, reset
from consulate.proxy.sklookup import REDIRECT, SK_LOOKUP
from consulate.proxy.stats import ProxyStats, ServiceCounters
from consulate.proxy.table import Endpoint, RouteTable

if TYPE_CHECKING:
    from consulate.native.engine import SpliceEngine

log = logging.getLogger("consulate.proxy")

DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_ATTEMPTS = 3
LISTEN_BACKLOG = 4096  # bursts of new connections wait in the kernel, not refused
# The agent could not make a socket (descriptors or memory ran out): outlier
# detection must not eject an endpoint for it (the native engine does the same).
_LOCAL_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(slots=True)
class _Route:
    """A Python-relayed connection's routing decision."""

    peer: tuple[str, int]
    service: str
    counters: ServiceCounters
    candidates: list[Endpoint]
    pool: ServicePool
    held: Endpoint | None = None  # counted open in its pool (least_conn, p2c)
    task: asyncio.Task[None] | None = None  # the one connecting it (its deadline's)

    def hold(self, endpoint: Endpoint) -> None:
        self.pool.connecting(endpoint)
        self.held = endpoint

    def release(self) -> None:
        if self.held is not None:
            self.pool.closed(self.held)
            self.held = None

    def closed(self) -> None:
        """The pair is over (``on_done``), whether it was ever connected or not."""
        self.counters.count_closed()
        self.release()


def _vip_in(vips: ipaddress.IPv4Network) -> Callable[[str], ipaddress.IPv4Address | None]:
    """Parses an address, None when it is not in ``vips``."""
    def vip_of(address: str) -> ipaddress.IPv4Address | None:
        parsed = ipaddress.IPv4Address(address)
        return parsed if parsed in vips else None
    return vip_of


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
        outlier: OutlierPolicy | None = None,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.table = table
        self.stats = ProxyStats()
        self.limits = limits if limits is not None else ConnectionLimits()
        self._episodes = LimitEpisodes()  # limit episodes, as logged (either relay)
        self._active = 0  # connections the Python relay admitted and has not closed
        self._outlier = outlier if outlier is not None else OutlierPolicy()
        self._pools: dict[str, ServicePool] = {}  # the Python relay's, by service
        self._return_timers: dict[str, asyncio.TimerHandle] = {}
        self._mark = mark
        self._steering: sklookup.SkLookup | None = None  # while sk_lookup brings connections
        self._connect_timeout = connect_timeout
        self._attempts = attempts
        self._listener: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        # The native engine, when there is one, and what passes between it and the proxy.
        self._link = (EngineLink(engine, table, self.limits, self._episodes)
                      if engine is not None else None)
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._python = PythonRelay()
        vips = table.vip_network
        # Endpoint addresses and VIPs repeat: parse each once, not per connection
        # (None: not in the VIP range).
        self._vip_of = functools.lru_cache(maxsize=4096)(_vip_in(vips))

    @property
    def relay_name(self) -> str:
        return "native" if self._link is not None else "python"

    @property
    def intercept(self) -> str:
        """How connections reach the listener now: sk-lookup or redirect."""
        return SK_LOOKUP if self._steering is not None else REDIRECT

    async def start(self, host: str, port: int, intercept: str = REDIRECT) -> None:
        """Listen, and with ``intercept`` sk-lookup (or auto) steer the VIP range to it.

        sk-lookup raises sklookup.SkLookupError when the kernel refuses; auto then
        logs why and relies on iptables REDIRECT (the caller installs its rules by
        ``intercept``, read after this returns).
        """
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        if intercept != REDIRECT:
            try:
                self._steering = sklookup.attach(listener, self.table.vip_network)
            except sklookup.SkLookupError as exc:
                if intercept == SK_LOOKUP:
                    listener.close()
                    self._listener = None
                    raise
                log.warning("event=sk-lookup-unavailable action=use-redirect error=%r", str(exc))
        if self._link is None:
            self._server = await loop.create_server(
                lambda: self._python.client(on_made=self._route_client), sock=listener,
                backlog=LISTEN_BACKLOG)
        else:
            loop.add_reader(self._link.engine.notify_fd, self._link.log_reports)
            self._link.publish_routes()
            self._unsubscribe = self.table.subscribe(self._link.publish_routes)
            self._link.engine.listen(listener, mark=self._mark, attempts=self._attempts,
                                marked_network=str(self.table.vip_network),
                                max_connections=self.limits.max_connections,
                                max_pending=self.limits.max_pending_per_service,
                                steered=self._steering is not None,
                                **asdict(self._outlier))
        log.info("event=listen component=proxy address=%s:%d relay=%s intercept=%s "
                 "max_connections=%d max_pending_per_service=%d", host, port, self.relay_name,
                 self.intercept, self.limits.max_connections,
                 self.limits.max_pending_per_service)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._server is not None:
            self._server.close()  # closes the listener too
            self._server = None
        if self._listener is not None:
            if self._link is not None:
                self._link.engine.unlisten()
            self._listener.close()
            self._listener = None
        if self._steering is not None:
            self._steering.close()
            self._steering = None
        for timer in self._return_timers.values():
            timer.cancel()
        self._return_timers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._python.close()
        if self._link is not None:
            loop.remove_reader(self._link.engine.notify_fd)
            self._link.log_reports()
            self._link.merge_counters(self.stats)
            self._link.engine.close()
            self._link = None

    def stats_snapshot(self) -> dict[str, object]:
        """The proxy's counters, whichever relay counted them."""
        if self._link is not None:
            self._link.merge_counters(self.stats)
        for name, pool in self._pools.items():
            self.stats.of(name).ejections_active = len(pool.outlier.ejected)
        return self.stats.snapshot()

    # -- the Python relay: route in connection_made, then connect and join -------

    def _route_client(self, client: RelaySide) -> None:
        assert isinstance(client, ClientSide) and client.transport is not None
        limits = self.limits
        if self._active >= limits.max_connections:
            self.stats.overflow += 1
            self._refuse(client.transport, MAX_CONNECTIONS, "", limits.max_connections)
            return
        self._limit_admitted(MAX_CONNECTIONS, "")
        route = self._route(client.transport)
        if route is None:
            return
        counters = route.counters
        if counters.pending_active >= limits.max_pending_per_service:
            counters.pending_overflow += 1
            self._refuse(client.transport, MAX_PENDING_PER_SERVICE, route.service,
                         limits.max_pending_per_service)
            return
        self._limit_admitted(MAX_PENDING_PER_SERVICE, route.service)
        self._active += 1
        counters.connections_active += 1
        counters.pending_active += 1
        client.on_bytes = counters.count_to_upstream
        client.on_done = functools.partial(self._closed, route)
        task = route.task = asyncio.get_running_loop().create_task(
            self._connect_and_join(client, route))
        self._tasks.add(task)  # until it returns (close() cancels those still there)

    def _closed(self, route: _Route) -> None:
        self._active -= 1
        route.closed()

    def _refuse(self, transport: asyncio.Transport, limit: str, service: str,
                value: int) -> None:
        """Reset a connection over a limit; log only the first of an episode."""
        reset(transport)
        episode = self._episodes.refused(limit, service, value, time.monotonic())
        if episode is not None:
            proxy_log.limit_reached(episode)

    def _limit_admitted(self, limit: str, service: str) -> None:
        episode = self._episodes.admitted(limit, service)
        if episode is not None:
            proxy_log.limit_cleared(episode, time.monotonic())

    def _route(self, transport: asyncio.Transport) -> _Route | None:
        """Where this connection goes, or None after resetting it (logged, counted)."""
        peer = transport.get_extra_info("peername")
        try:
            vip, port = self._destination(transport)
        except (OSError, ValueError) as exc:
            self.stats.unrouted += 1
            log.warning("event=reject client=%s:%d reason=no-original-destination error=%s",
                        *peer, exc)
            reset(transport)
            return None
        service = self.table.service_by_vip(vip)
        if service is None:
            self.stats.unrouted += 1
            log.warning("event=reject client=%s:%d destination=%s:%d reason=unknown-vip",
                        *peer, vip, port)
            reset(transport)
            return None
        counters = self.stats.of(service.name)
        counters.connections_total += 1
        pool = self._pools.get(service.name)
        if pool is None or pool.lb != service.lb:
            pool = self._pools[service.name] = ServicePool(service.lb, self._outlier)
        candidates = pool.candidates(service.tcp_endpoints, self._attempts, peer[0])
        if not candidates:
            counters.rejected += 1
            log.warning("event=reject client=%s:%d service=%s vip=%s reason=no-endpoints",
                        *peer, service.name, vip)
            reset(transport)
            return None
        return _Route(peer, service.name, counters, candidates, pool)

    async def _connect_and_join(self, client: RelaySide, route: _Route) -> None:
        """Try the candidates in turn; the connection is pending until this returns."""
        try:
            for endpoint in route.candidates:
                if client.closed:
                    return  # the client gave up meanwhile (its pair is already over)
                if await self._try_endpoint(client, endpoint, route):
                    return
            route.counters.rejected += 1
            log.warning("event=reject client=%s:%d service=%s reason=all-attempts-failed "
                        "attempts=%d", *route.peer, route.service, len(route.candidates))
            assert client.transport is not None
            reset(client.transport)
        finally:
            route.counters.pending_active -= 1
            self._tasks.discard(route.task)

    async def _try_endpoint(self, client: RelaySide, endpoint: Endpoint,
                            route: _Route) -> bool:
        """Connect to one endpoint and relay it with ``client``; False when it failed.

        The connect timeout is a shared deadline (proxy/deadlines.py), not an
        ``asyncio.timeout`` of its own: it cancels the task, and the
        CancelledError it causes becomes the TimeoutError here.
        """
        address = (endpoint.address, endpoint.port)
        counters = route.counters
        deadlines, task = self._python.deadlines, route.task
        assert task is not None
        route.hold(endpoint)
        deadlines.start(task, self._connect_timeout)
        expired = False
        try:
            try:
                if self._mark and self._vip_of(endpoint.address) is not None:
                    # Only a connection to an address inside the VIP range needs the
                    # mark that exempts it from REDIRECT (uvloop cannot set it before
                    # connecting, so this rare case connects its own socket).
                    await self._python.join(client, counters.count_to_client,
                                            sock=await self._marked_connection(address))
                else:
                    await self._python.join(client, counters.count_to_client,
                                            address=address)
            finally:
                expired = deadlines.stop(task)
        except asyncio.CancelledError:
            if not expired:
                raise
            task.uncancel()
            self._connect_failed(endpoint, route, TimeoutError())
            return False
        except OSError as exc:
            self._connect_failed(endpoint, route, exc)
            return False
        route.pool.connected(endpoint)
        return True

    def _connect_failed(self, endpoint: Endpoint, route: _Route, exc: OSError) -> None:
        """Count and log a failed connect; eject the endpoint if it keeps failing."""
        counters = route.counters
        route.release()
        counters.connect_failures += 1
        reason = "timeout" if isinstance(exc, TimeoutError) else exc.strerror or repr(exc)
        log.warning("event=connect-failed service=%s endpoint=%s address=%s:%d error=%r",
                    endpoint.service, endpoint.id, endpoint.address, endpoint.port, reason)
        if exc.errno in _LOCAL_SHORTAGES:
            return  # no socket to try with: not the endpoint's failure
        service = self.table.service(route.service)
        ejection = route.pool.failed(endpoint, service.tcp_endpoints if service else ())
        if ejection is not None:
            counters.ejections += 1
            proxy_log.ejected(self.table, route.service, ejection)
            self._schedule_returns(route.service)

    def _schedule_returns(self, name: str) -> None:
        """Wake up when the service's next ejected endpoint is due back."""
        pool = self._pools.get(name)
        due = pool.outlier.next_return() if pool is not None else None
        timer = self._return_timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        if due is not None:
            # A timer may fire a hair early for the monotonic clock: 1 ms of slack.
            self._return_timers[name] = asyncio.get_running_loop().call_later(
                max(due - time.monotonic(), 0) + 0.001, self._release_due, name)

    def _release_due(self, name: str) -> None:
        self._return_timers.pop(name, None)
        pool = self._pools.get(name)
        if pool is None:
            return
        for address, port in pool.outlier.release_due():
            proxy_log.returned(self.table, name, address, port)
        self._schedule_returns(name)

    def _destination(self, transport: asyncio.Transport) -> tuple[ipaddress.IPv4Address, int]:
        """The VIP and port the client asked for (OSError or ValueError: not a VIP's)."""
        if self._steering is None:
            return original_dst(transport.get_extra_info("socket"))
        address, port = transport.get_extra_info("sockname")[:2]
        vip = self._vip_of(address)
        if vip is None:
            raise ValueError(f"{address}:{port} is not in the VIP range: not steered here")
        return vip, port

    async def _marked_connection(self, address: tuple[str, int]) -> socket.socket:
        if self._steering is not None:  # sk_lookup would steer it back to us: the
            # local route's answer, as REDIRECT gives it to a marked connection
            raise ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self._mark)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock
