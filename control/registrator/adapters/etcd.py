"""``etcd://host:port/prefix`` and ``skydns2://host:port/domain``: entries in etcd v3.

etcd: ``<prefix>/<service-name>/<service-id> = <ip>:<port>``, as registrator's
etcd backend writes them. skydns2: ``/skydns/<domain, reversed>/<name>/<id> =
{"host": ip, "port": port}``, the layout SkyDNS 2 and CoreDNS's etcd plugin read.
With ``-ttl`` each entry holds a lease of that many seconds that ``-ttl-refresh``
renews; an entry whose lease has run out is written again.
"""

from __future__ import annotations

import contextlib
import json

import aetcd
import aetcd.exceptions

from consulate.control.etcd_client import open_client
from consulate.control.registrator.adapters.base import Adapter, AdapterError
from consulate.control.registrator.model import Service, is_own_id


class EtcdAdapter(Adapter):
    """Keys are etcd keys; ``root`` is the prefix every key starts with."""

    def __init__(self, uri: str, hostname: str, host: str, port: int, root: str) -> None:
        super().__init__(uri, hostname)
        self.where = f"etcd at {host}:{port}"
        self.root = root.rstrip("/")
        self._client = open_client([(host, port)])
        self._leases: dict[str, int] = {}

    def key(self, service: Service) -> str:
        return f"{self.root}/{service.name}/{service.id}"

    def value(self, service: Service) -> str:
        return f"{service.ip}:{service.port}"

    async def ping(self) -> None:
        try:
            await self._client.get(self.root.encode() or b"/")
        except aetcd.exceptions.ClientError as exc:
            raise self._error("answer", exc) from None

    async def register(self, service: Service) -> None:
        key = self.key(service)
        try:
            lease = await self._client.lease(service.ttl) if service.ttl > 0 else None
            await self._client.put(key.encode(), self.value(service).encode(), lease=lease)
        except aetcd.exceptions.ClientError as exc:
            raise self._error(f"store {key}", exc) from None
        if lease is not None:
            old = self._leases.get(key)
            self._leases[key] = lease.id
            if old is not None:
                await self._revoke(old)

    async def refresh(self, service: Service) -> None:
        lease_id = self._leases.get(self.key(service))
        if lease_id is None:
            await self.register(service)
            return
        try:
            reply = await self._client.refresh_lease(lease_id)
        except aetcd.exceptions.ClientError as exc:
            raise self._error(f"renew the lease of {service.id}", exc) from None
        if reply is None or reply.TTL <= 0:  # expired: the entry is gone with it
            await self.register(service)

    async def remove(self, key: str) -> None:
        try:
            await self._client.delete(key.encode())
        except aetcd.exceptions.ClientError as exc:
            raise self._error(f"delete {key}", exc) from None
        lease_id = self._leases.pop(key, None)
        if lease_id is not None:
            await self._revoke(lease_id)

    async def registered(self) -> list[str]:
        try:
            found = await self._client.get_prefix(f"{self.root}/".encode(), keys_only=True)
        except aetcd.exceptions.ClientError as exc:
            raise self._error(f"list {self.root}/", exc) from None
        keys = (item.key.decode() for item in found)
        return sorted(k for k in keys if is_own_id(k.rsplit("/", 1)[-1], self.hostname))

    async def close(self) -> None:
        await self._client.close()

    async def _revoke(self, lease_id: int) -> None:
        """Drop a lease no entry uses any more; it would expire by itself anyway."""
        with contextlib.suppress(aetcd.exceptions.ClientError):
            await self._client.revoke_lease(lease_id)

    def _error(self, what: str, exc: Exception) -> AdapterError:
        return AdapterError(f"{self.where} did not {what} ({exc}): start it or fix the "
                            "registry URI")


class Skydns2Adapter(EtcdAdapter):
    """SkyDNS 2 records: the domain's labels reversed under /skydns, JSON values."""

    def __init__(self, uri: str, hostname: str, host: str, port: int, domain: str) -> None:
        labels = [label for label in domain.strip("/").split(".") if label]
        super().__init__(uri, hostname, host, port, "/skydns/" + "/".join(reversed(labels)))

    def value(self, service: Service) -> str:
        return json.dumps({"host": service.ip, "port": service.port})
