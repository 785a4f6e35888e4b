"""Ambassador listeners (Ambassadord): route each connection by a backend spec.

Two modes share this server:

- **omni** (in the agent, ``--ambassador``): iptables REDIRECTs containers' TCP to
  the Docker bridge address, on any port but the agent's own, onto this
  listener. The original destination port (SO_ORIGINAL_DST) and the caller's
  container, found by its source IP (``CallerLookup``), give the spec: the
  container's ``BACKEND_<port>`` variable or ``connect.<port>`` label.
- **standalone** (``consulate ambassador <spec>``): every connection follows one spec.

A spec resolves to endpoints (a static list, a service's live endpoints, or the
spec held by a watched KV key), which are balanced and connected with retries on
distinct endpoints as the transparent proxy does: the same ``ServicePool``
(balancer, connections per endpoint, outlier ejection) and the same relay.
A connection with no backend is closed with a reset, as the proxy closes one to
a VIP with no endpoints, and one log line says who called, on which port, and why.

The relay is ``PythonRelay``, not the native splice engine: the engine accepts
and routes in C by VIP tables, while a route here needs a Docker lookup and
perhaps a KV read before the first byte can go anywhere, which is Python's
(asyncio's) work. The client side buffers what the caller sends meanwhile.
The connect loop mirrors ``TransparentProxy._connect_and_join`` in proxy/server.py,
which is private to the VIP proxy and its per-service counters.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from consulate.proxy.ambassador_callers import Caller
from consulate.proxy.ambassador_kv import KvUnavailable, KvWatchers
from consulate.proxy.ambassador_spec import (
    BadSpec,
    KvSpec,
    RouteSpec,
    ServiceSpec,
    StaticSpec,
    parse_kv_value,
    parse_spec,
)
from consulate.proxy.balance import DEFAULT_LB, Upstream
from consulate.proxy.origdst import original_dst
from consulate.proxy.outlier import OutlierPolicy
from consulate.proxy.pool import ServicePool
from consulate.proxy.relay import ClientSide, PythonRelay, RelaySide, reset
from consulate.proxy.table import RouteTable

log = logging.getLogger("consulate.ambassador")

DEFAULT_PORT = 10000  # Ambassadord's
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_ATTEMPTS = 3
LISTEN_BACKLOG = 4096


class NoBackend(Exception):
    """Nowhere to send a connection: ``reason`` is a token for the log, the message why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class CallerLookup(Protocol):
    """The container behind a source IP (omni mode), or None when no container has it."""

    async def caller(self, ip: str) -> Caller | None: ...


@dataclass(frozen=True)
class ServiceRoute:
    endpoints: Sequence[Upstream]
    lb: str = DEFAULT_LB


class ServiceLookup(Protocol):
    """A service's live endpoints and balancer, or None when the registry has no such name."""

    async def service(self, name: str) -> ServiceRoute | None: ...


class TableServices:
    """Services from the agent's RouteTable: live (passing) endpoints, the service's lb."""

    def __init__(self, table: RouteTable) -> None:
        self._table = table

    async def service(self, name: str) -> ServiceRoute | None:
        found = self._table.service(name)
        return ServiceRoute(found.endpoints, found.lb) if found is not None else None


@dataclass
class AmbassadorStats:
    connections_total: int = 0
    connections_active: int = 0
    no_backend: int = 0
    connect_failures: int = 0


@dataclass
class _Request:
    """What a connection asks for: who called, on which port, by which spec (filled in
    as it is learnt, so that a refusal logs what was known)."""

    caller_ip: str
    port: int
    container: str = "-"
    spec: str = ""


class Ambassador:
    """Routes accepted connections by ``spec`` (standalone) or by caller (``callers``);
    ``services`` resolves the service names specs give."""

    def __init__(self, *, services: ServiceLookup, spec: str | None = None,
                 callers: CallerLookup | None = None, kv: KvWatchers,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 attempts: int = DEFAULT_ATTEMPTS,
                 outlier: OutlierPolicy | None = None) -> None:
        if (spec is None) == (callers is None):
            raise ValueError("an ambassador routes by one spec or by its callers' rules")
        if spec is not None:
            parse_spec(spec)  # BadSpec now rather than at the first connection
        self.stats = AmbassadorStats()
        self._spec = spec
        self._callers = callers
        self._services = services
        self._kv = kv
        self._connect_timeout = connect_timeout
        self._attempts = attempts
        self._outlier = outlier if outlier is not None else OutlierPolicy()
        self._pools: dict[str, ServicePool] = {}
        self._relay = PythonRelay()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as exc:
            listener.close()
            raise OSError(f"the ambassador cannot listen on {host}:{port} "
                          f"({exc.strerror}): stop what holds it, or choose another "
                          "address") from None
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self._relay.client(on_made=self._accepted), sock=listener,
            backlog=LISTEN_BACKLOG)
        self.address = listener.getsockname()
        log.info("event=listen component=ambassador address=%s:%d mode=%s spec=%r",
                 *self.address, "standalone" if self._spec is not None else "omni",
                 self._spec or "")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._relay.close()
        await self._kv.close()

    def stats_snapshot(self) -> dict[str, int]:
        return asdict(self.stats)

    # -- per connection ------------------------------------------------------------

    def _accepted(self, client: RelaySide) -> None:
        assert isinstance(client, ClientSide) and client.transport is not None
        self.stats.connections_total += 1
        self.stats.connections_active += 1
        client.on_done = self._ended
        task = asyncio.get_running_loop().create_task(self._route_and_join(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ended(self) -> None:
        self.stats.connections_active -= 1

    async def _route_and_join(self, client: ClientSide) -> None:
        transport = client.transport
        assert transport is not None
        ip, _ = transport.get_extra_info("peername")
        request = _Request(ip, transport.get_extra_info("sockname")[1])
        try:
            await self._learn(transport, request)
            key, route = await self._resolve(request.spec)
            await self._connect(client, request, key, route)
        except NoBackend as exc:
            self.stats.no_backend += 1
            log.warning("event=no-backend caller=%s container=%s port=%d spec=%r reason=%s "
                        "error=%r", request.caller_ip, request.container, request.port,
                        request.spec, exc.reason, str(exc))
            reset(transport)

    async def _learn(self, transport: asyncio.Transport, request: _Request) -> None:
        """Fill in the spec this connection follows, and who asked for it."""
        if self._spec is not None:
            request.spec = self._spec
            return
        assert self._callers is not None
        try:
            _, request.port = original_dst(transport.get_extra_info("socket"))
        except (OSError, ValueError) as exc:
            raise NoBackend("no-original-destination", f"not a redirected connection ({exc})"
                            ) from None
        try:
            caller = await self._callers.caller(request.caller_ip)
        except OSError as exc:
            raise NoBackend("docker-unavailable", str(exc)) from None
        if caller is None:
            raise NoBackend("unknown-caller", f"no running container has the address "
                            f"{request.caller_ip}")
        request.container = caller.name
        spec = caller.rules.specs.get(request.port)
        if spec is None:
            raise NoBackend("no-rule", f"the container sets neither BACKEND_{request.port} nor "
                            f"the label connect.{request.port}")
        request.spec = spec

    async def _resolve(self, text: str) -> tuple[str, ServiceRoute]:
        """The endpoints ``text`` routes to now, with the name of their pool."""
        try:
            spec = parse_spec(text)
        except BadSpec as exc:
            raise NoBackend("bad-spec", str(exc)) from None
        if isinstance(spec, KvSpec):
            try:
                value = await self._kv.value(spec)
            except KvUnavailable as exc:
                raise NoBackend("kv-unavailable", str(exc)) from None
            if value is None:
                raise NoBackend("kv-missing", f"{spec.uri} does not exist: write a spec there "
                                "(for example 10.0.0.5:80,10.0.0.6:80 or a service name)")
            try:
                inner = parse_kv_value(value, spec.uri)
            except BadSpec as exc:
                raise NoBackend("bad-spec", str(exc)) from None
            return await self._resolve_route(inner)
        return await self._resolve_route(spec)

    async def _resolve_route(self, spec: RouteSpec) -> tuple[str, ServiceRoute]:
        if isinstance(spec, StaticSpec):
            return ",".join(f"{t.address}:{t.port}" for t in spec.targets), \
                ServiceRoute(spec.targets)
        assert isinstance(spec, ServiceSpec)
        try:
            route = await self._services.service(spec.name)
        except OSError as exc:
            raise NoBackend("registry-unavailable", str(exc)) from None
        if route is None or not route.endpoints:
            raise NoBackend("no-endpoints", f"service {spec.name!r} has no live instance")
        return f"service:{spec.name}", route

    def _pool(self, key: str, lb: str) -> ServicePool:
        pool = self._pools.get(key)
        if pool is None or pool.lb != lb:
            pool = self._pools[key] = ServicePool(lb, self._outlier)
        for address, port in pool.outlier.release_due():  # returns are due at the next pick
            log.info("event=uneject pool=%s address=%s:%d", key, address, port)
        return pool

    async def _connect(self, client: ClientSide, request: _Request, key: str,
                       route: ServiceRoute) -> None:
        """Connect to the first endpoint that accepts and join it to ``client``."""
        pool = self._pool(key, route.lb)
        held: list[Upstream] = []

        def release() -> None:
            if held:
                pool.closed(held.pop())

        def ended() -> None:
            release()
            self._ended()

        client.on_done = ended
        candidates = pool.candidates(route.endpoints, self._attempts, request.caller_ip)
        for endpoint in candidates:
            if client.closed:
                return  # the caller gave up meanwhile
            pool.connecting(endpoint)
            held.append(endpoint)
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._relay.join(client, _ignore, address=(endpoint.address,
                                                                     endpoint.port))
            except (OSError, TimeoutError) as exc:
                release()
                self.stats.connect_failures += 1
                error = "timeout" if isinstance(exc, TimeoutError) else exc.strerror or repr(exc)
                log.warning("event=connect-failed pool=%s address=%s:%d error=%r", key,
                            endpoint.address, endpoint.port, error)
                ejection = pool.failed(endpoint, route.endpoints)
                if ejection is not None:
                    log.warning("event=eject pool=%s address=%s:%d "
                                "type=consecutive_connect_failure failures=%d "
                                "ejection_time=%.3f", key, *ejection.key, ejection.failures,
                                ejection.seconds)
                continue
            pool.connected(endpoint)
            log.debug("event=route caller=%s container=%s port=%d pool=%s address=%s:%d",
                      request.caller_ip, request.container, request.port, key,
                      endpoint.address, endpoint.port)
            return
        raise NoBackend("all-attempts-failed", f"{len(candidates)} of {key} refused or timed out")


def _ignore(_count: int) -> None:
    """Bytes are not counted per ambassador route (the relay needs a counter)."""
