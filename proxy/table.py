"""RouteTable: the agent's single in-memory model of the cluster.

Services map to endpoints and to a stable VIP. The control plane writes it (the
agent feeds it from the registry watch); the proxy and DNS only read it. Every
write bumps ``version`` and notifies subscribers, so consumers such as the
iptables manager react to changes instead of polling.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from consulate.proxy.balance import DEFAULT_LB, resolve_lb
from consulate.proxy.vip import VipAllocator

log = logging.getLogger("consulate.routes")


@dataclass(frozen=True)
class Endpoint:
    """One live instance the proxy may connect to.

    ``weight`` is the registration's passing weight (Consul's ``Weights.Passing``):
    DNS sends it in SRV records and samples by it when an answer must be trimmed,
    and lb=weighted balances by it. ``lb`` is the instance's meta ``lb``: the
    balancer it asks for its service.
    """

    service: str
    id: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    node: str = ""
    weight: int = 1
    lb: str = ""


@dataclass
class Service:
    """A service as routed: its VIP, endpoints (ordered by id) and balancer.

    ``lb`` is the balancer (proxy/balance.py's LB_NAMES) the first endpoint (by
    id) that sets meta ``lb`` asks for; ``lb_meta`` that raw value.
    ``tcp_endpoints`` are the endpoints the TCP proxy connects to: all but those
    tagged ``udp`` (registrator's mark of a UDP port, served by proxy/udp.py);
    kept as one tuple per change, so that consumers can tell changes by identity.
    """

    name: str
    vip: ipaddress.IPv4Address
    endpoints: tuple[Endpoint, ...] = ()
    tcp_endpoints: tuple[Endpoint, ...] = ()
    lb: str = DEFAULT_LB
    lb_meta: str = ""


Listener = Callable[[int], None]


def _assign(service: Service, endpoints: tuple[Endpoint, ...]) -> None:
    """Set a service's endpoints, and the TCP subset with them."""
    service.endpoints = endpoints
    service.tcp_endpoints = tuple(e for e in endpoints if "udp" not in e.tags)


class RouteTable:
    """Services by name and by VIP, with a version that grows on every change."""

    def __init__(self, vips: VipAllocator) -> None:
        self._vips = vips
        self._services: dict[str, Service] = {}
        self._service_of: dict[str, str] = {}  # endpoint id -> service name
        self._folded: dict[str, Service] = {}  # lower-cased name -> service
        self._listeners: list[Listener] = []
        self.version = 0

    # -- reads (data plane) ----------------------------------------------------

    @property
    def vip_network(self) -> ipaddress.IPv4Network:
        return self._vips.network

    def service(self, name: str) -> Service | None:
        return self._services.get(name)

    def service_folded(self, name: str) -> Service | None:
        """A service by case-insensitive name, as DNS asks for it."""
        return self._folded.get(name.lower())

    def service_by_vip(self, address: ipaddress.IPv4Address) -> Service | None:
        name = self._vips.name_for(address)
        return self._services.get(name) if name is not None else None

    def services(self) -> list[Service]:
        return [self._services[name] for name in sorted(self._services)]

    # -- writes (control plane) ------------------------------------------------

    def replace_all(self, endpoints: Iterable[Endpoint]) -> None:
        """Make the table hold exactly these endpoints (a registry snapshot).

        Services that lose all endpoints stay, with their VIP: a client that
        resolved the name earlier is refused cleanly rather than misrouted.
        """
        grouped: dict[str, list[Endpoint]] = {name: [] for name in self._services}
        for endpoint in endpoints:
            grouped.setdefault(endpoint.service, []).append(endpoint)
        self._service_of = {}
        for name, members in grouped.items():
            self._set_endpoints(name, members)
        self._changed()

    def upsert(self, endpoint: Endpoint) -> None:
        previous = self._service_of.get(endpoint.id)
        if previous is not None and previous != endpoint.service:
            self._drop_endpoint(previous, endpoint.id)
        service = self._ensure(endpoint.service)
        others = [e for e in service.endpoints if e.id != endpoint.id]
        self._set_endpoints(endpoint.service, [*others, endpoint])
        self._changed()

    def remove(self, endpoint_id: str) -> None:
        name = self._service_of.get(endpoint_id)
        if name is None:
            return
        self._drop_endpoint(name, endpoint_id)
        self._changed()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(version)`` after every change; returns the unsubscriber."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # -- internals -------------------------------------------------------------

    def _ensure(self, name: str) -> Service:
        service = self._services.get(name)
        if service is None:
            service = Service(name=name, vip=self._vips.vip_for(name))
            self._services[name] = service
            self._folded.setdefault(name.lower(), service)
            log.info("event=vip service=%s vip=%s", name, service.vip)
        return service

    def _set_endpoints(self, name: str, members: list[Endpoint]) -> None:
        service = self._ensure(name)
        _assign(service, tuple(sorted(members, key=lambda e: e.id)))
        for endpoint in members:
            self._service_of[endpoint.id] = name
        self._set_lb(service)

    def _set_lb(self, service: Service) -> None:
        meta = next((e.lb for e in service.endpoints if e.lb), "")
        if meta == service.lb_meta or not service.endpoints:
            return  # unchanged (or no endpoint left to say: keep the last choice)
        service.lb_meta = meta
        service.lb, error = resolve_lb(meta)
        if error is not None:
            log.warning("event=lb-unknown service=%s lb=%s using=%s error=%r", service.name,
                        meta, service.lb, error)
        else:
            log.info("event=lb service=%s lb=%s", service.name, service.lb)

    def _drop_endpoint(self, name: str, endpoint_id: str) -> None:
        service = self._services[name]
        _assign(service, tuple(e for e in service.endpoints if e.id != endpoint_id))
        del self._service_of[endpoint_id]

    def _changed(self) -> None:
        self.version += 1
        for listener in list(self._listeners):
            listener(self.version)
