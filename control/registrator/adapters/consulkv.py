"""``consulkv://host:port/prefix``: ``<prefix>/<service-name>/<service-id> = <ip>:<port>``
in Consul's key-value store, as registrator's Consul KV backend writes them
(no TTL: entries stay until deregistered)."""

from __future__ import annotations

from consulate.control.registrator.adapters.base import Adapter
from consulate.control.registrator.adapters.consul_http import ConsulHttp
from consulate.control.registrator.adapters.consul_tls import HttpsSettings
from consulate.control.registrator.model import Service, is_own_id


class ConsulKvAdapter(Adapter):
    """Keys are KV paths (Consul KV paths have no leading slash)."""

    def __init__(self, uri: str, hostname: str, host: str, port: int, prefix: str,
                 https: HttpsSettings | None = None) -> None:
        super().__init__(uri, hostname)
        self.http = ConsulHttp("Consul", host, port, https)
        self.prefix = prefix.strip("/")

    def key(self, service: Service) -> str:
        return "/".join(p for p in (self.prefix, service.name, service.id) if p)

    async def ping(self) -> None:
        await self.http.call("GET", "/v1/status/leader")

    async def register(self, service: Service) -> None:
        value = f"{service.ip}:{service.port}".encode()
        await self.http.call("PUT", f"/v1/kv/{self.key(service)}", raw=value)

    async def remove(self, key: str) -> None:
        await self.http.call("DELETE", f"/v1/kv/{key}", missing_ok=True)

    async def registered(self) -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        keys = await self.http.call("GET", f"/v1/kv/{root}?keys", missing_ok=True) or []
        return sorted(k for k in keys if is_own_id(k.rsplit("/", 1)[-1], self.hostname))

    async def refresh(self, service: Service) -> None:
        """Nothing to renew: Consul KV entries have no TTL here (as in registrator)."""

    async def close(self) -> None:
        await self.http.close()
