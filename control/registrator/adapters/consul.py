"""``consul://`` and ``consulate://``: services in an agent's catalog, over Consul's
HTTP API (``/v1/agent/service/...``).

``consul://`` behaves as registrator's Consul backend, against a Consul agent or
consulate's Consul-compatible API. ``consulate://`` is the adapter consulate's
agent uses for itself: the same calls, plus liveness: ``-ttl`` registers a TTL
check ``liveness:<id>`` that ``-ttl-refresh`` passes; without refreshes the
instance turns critical (unrouted) after the TTL and is deregistered after as
long again. It keeps its own class so that it can move to the native registry API.
"""

from __future__ import annotations

import logging

from consulate.control.registrator.adapters.base import Adapter
from consulate.control.registrator.adapters.consul_http import ConsulHttp
from consulate.control.registrator.adapters.consul_tls import HttpsSettings
from consulate.control.registrator.checks import consul_meta, consul_registration
from consulate.control.registrator.model import Service, is_own_id
from consulate.control.registry.consul_agent import liveness_check_id

log = logging.getLogger("consulate.registrator")


class ConsulAdapter(Adapter):
    """Registers into an agent's catalog; keys are service IDs."""

    store = "Consul"
    scheme = "consul"

    def __init__(self, uri: str, hostname: str, host: str, port: int,
                 https: HttpsSettings | None = None) -> None:
        super().__init__(uri, hostname)
        self.http = ConsulHttp(self.store, host, port, https)
        self._warned: set[str] = set()  # services whose refused attributes were logged

    async def ping(self) -> None:
        leader = await self.http.call("GET", "/v1/status/leader")
        log.info("%s: current leader %s", self.scheme, leader)

    async def register(self, service: Service) -> None:
        refused = consul_meta(service)[1]
        if refused and service.id not in self._warned:
            self._warned.add(service.id)
            log.warning("attributes %s of %s not sent as Meta: Consul allows up to 64 keys "
                        "of letters, digits, '-' and '_'", ", ".join(refused), service.id)
        await self.http.call("PUT", "/v1/agent/service/register", body=self.body(service))

    def body(self, service: Service) -> dict[str, object]:
        return consul_registration(service)

    async def remove(self, key: str) -> None:
        await self.http.call("PUT", f"/v1/agent/service/deregister/{key}", missing_ok=True)

    async def registered(self) -> list[str]:
        services = await self.http.call("GET", "/v1/agent/services") or {}
        return sorted(key for key in services if is_own_id(key, self.hostname))

    async def refresh(self, service: Service) -> None:
        """Nothing to renew: registrator's Consul backend ignores -ttl."""

    async def close(self) -> None:
        await self.http.close()


class ConsulateAdapter(ConsulAdapter):
    """consulate's agent API; ``-ttl`` becomes a liveness lease renewed by ``-ttl-refresh``."""

    store = "consulate agent"
    scheme = "consulate"

    def body(self, service: Service) -> dict[str, object]:
        body = consul_registration(service)
        if service.ttl > 0:
            body["Checks"] = [{"CheckID": liveness_check_id(service.id),
                               "Name": "registrator liveness", "TTL": f"{service.ttl}s",
                               "Status": "passing",
                               "DeregisterCriticalServiceAfter": f"{service.ttl}s"}]
        return body

    async def refresh(self, service: Service) -> None:
        if service.ttl > 0:
            await self.http.call("PUT",
                                 f"/v1/agent/check/pass/{liveness_check_id(service.id)}")
