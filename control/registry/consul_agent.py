"""The consul backend: the registry kept by a Consul agent, through its HTTP API.

For sites that already run Consul: instances are Consul services registered
through the agent with their health checks (a liveness TTL is a TTL check
``liveness:<id>`` that a heartbeat passes; once it goes critical the instance
counts as gone), reads come from the health endpoint (so checks' results come
along), KV is Consul's KV with its check-and-set, and the index is Consul's
X-Consul-Index. The client is py-consul's asyncio one, over http or, for an
``https://`` agent, TLS with ``--ca-file`` and ``--client-cert/--client-key``.

Consul has no change stream: ``watch`` long-polls the catalog (a blocking query
on the service list, which moves on every catalog write) and emits the
difference between successive reads as ``up``/``down`` changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import warnings
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import aiohttp
import consul
import consul.aio

from consulate.control.error_text import error_text
from consulate.control.health.consul_json import check_from_entry, registration_check
from consulate.control.registry.model import (
    Change,
    Instance,
    KVEntry,
    RegistryUnavailable,
    UnknownInstance,
    changes_between,
)
from consulate.control.tls import client_context

log = logging.getLogger("consulate.registry.consul")

WATCH_WAIT = "30s"  # per blocking query; the loop asks again at once
RETRY_DELAY = 1.0  # after the agent could not be reached

T = TypeVar("T")


def liveness_check_id(instance_id: str) -> str:
    """The TTL check that carries a Discoverd-style liveness TTL in Consul."""
    return f"liveness:{instance_id}"


def _live(entry: dict[str, Any]) -> bool:
    """False once the liveness TTL ran out: to the registry the instance is gone
    (Consul deregisters it later, after DeregisterCriticalServiceAfter)."""
    liveness = liveness_check_id(entry["Service"]["ID"])
    return not any(c.get("CheckID") == liveness and c.get("Status") == "critical"
                   for c in entry.get("Checks") or ())


def _instance(entry: dict[str, Any]) -> Instance:
    """An instance from one ``/v1/health/service`` element, with its checks' results."""
    service = entry["Service"]
    weights = service.get("Weights") or {}
    checks = tuple(check_from_entry(c) for c in entry.get("Checks") or ()
                   if c.get("ServiceID") == service["ID"])
    liveness = next((c for c in checks if c.id == liveness_check_id(service["ID"])), None)
    return Instance(
        id=service["ID"], name=service["Service"],
        address=service.get("Address") or entry["Node"].get("Address", ""),
        port=int(service["Port"]), tags=tuple(service.get("Tags") or ()),
        meta=dict(service.get("Meta") or {}), node=entry["Node"].get("Node", ""),
        weight=int(weights.get("Passing", 1)), warning_weight=int(weights.get("Warning", 1)),
        ttl=liveness.ttl if liveness is not None else None, checks=checks,
        create_index=int(service.get("CreateIndex", 0)),
        modify_index=int(service.get("ModifyIndex", 0)),
    )


class ConsulRegistry:
    """RegistryBackend on a Consul agent's HTTP API."""

    def __init__(self, host: str, port: int = 8500, *, token: str = "", https: bool = False,
                 ca_file: str = "", client_cert: str = "", client_key: str = "") -> None:
        """``https``: TLS, the agent's certificate checked against ``ca_file`` (the
        system's CAs without one), presenting ``client_cert`` when given."""
        self._https = https
        self._where = f"{host}:{port}"
        if https:  # the files checked here, with errors naming the flags (TlsError)
            client_context(ca_file, client_cert, client_key)
        with warnings.catch_warnings():
            # py-consul's asyncio client still hands aiohttp its deprecated
            # verify_ssl/ssl_context arguments (it builds its context from the paths).
            warnings.filterwarnings("ignore", "(verify_ssl|ssl_context) is deprecated",
                                    DeprecationWarning)
            self._consul = consul.aio.Consul(
                host=host, port=port, token=token or None, scheme="https" if https else "http",
                verify=ca_file or True, cert=(client_cert, client_key) if client_cert else None)
        self._index = 0

    def start(self) -> None:
        """Nothing to run here: the Consul agent expires TTL checks itself."""

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except (aiohttp.ClientError, OSError, consul.Timeout) as exc:
            raise RegistryUnavailable(self._failure(what, exc)) from None

    def _failure(self, what: str, exc: BaseException) -> str:
        """Why the agent could not be reached, and what to do about it."""
        reason = f"{what}: {error_text(exc)}"
        # An agent that refuses our client certificate may just hang up.
        hung_up = isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
                             ) and not isinstance(exc, aiohttp.ClientConnectorError)
        if self._https and (isinstance(exc, (aiohttp.ClientSSLError, ssl.SSLError)) or hung_up):
            return (f"TLS with the agent at https://{self._where} failed ({reason}): pass "
                    "--ca-file with the CA that signed its certificate, and --client-cert and "
                    "--client-key if it verifies clients (--tls-ca)")
        if hung_up:
            return (f"the agent at http://{self._where} closed the connection without an "
                    f"answer ({reason}): if it serves TLS (--tls-cert), use an https:// "
                    "address")
        return (f"consul agent at {self._where} is not answering ({reason}): start it, or "
                "pass --registry embedded")

    def _saw(self, index: Any) -> int:
        if index is not None:
            self._index = max(self._index, int(index))
        return self._index

    # -- mutations -------------------------------------------------------------

    async def register(self, instance: Instance) -> Instance:
        old = await self.get(instance.id)
        if old is not None and old.same_registration(instance.indexed(0, 0)):
            return old
        checks = [registration_check(c) for c in instance.checks
                  if c.id != liveness_check_id(instance.id)]
        if instance.ttl is not None:
            # Liveness as Consul has it: a TTL check that starts passing, goes
            # critical (unrouted) when heartbeats stop, and deregisters the
            # instance after as long again.
            checks.insert(0, {"CheckID": liveness_check_id(instance.id),
                              "Name": "liveness (TTL)", "TTL": f"{instance.ttl}s",
                              "Status": "passing",
                              "DeregisterCriticalServiceAfter": f"{instance.ttl}s"})
        await self._call("register", self._consul.agent.service.register(
            instance.name, service_id=instance.id, address=instance.address,
            port=instance.port, tags=list(instance.tags), meta=dict(instance.meta),
            weights={"Passing": instance.weight, "Warning": instance.warning_weight},
            check=checks[0] if checks else None, extra_checks=checks[1:]))
        stored = await self.get(instance.id)
        if stored is None:
            raise UnknownInstance(instance.id)
        return stored

    async def deregister(self, instance_id: str) -> int:
        if await self.get(instance_id) is None:
            raise UnknownInstance(instance_id)
        await self._call("deregister", self._consul.agent.service.deregister(instance_id))
        return await self._current_index()

    async def heartbeat(self, instance_id: str) -> None:
        if await self.get(instance_id) is None:
            raise UnknownInstance(instance_id)
        with contextlib.suppress(consul.NotFound):  # an instance without a liveness TTL
            await self._call("heartbeat", self._consul.agent.check.ttl_pass(
                liveness_check_id(instance_id)))

    # -- reads -----------------------------------------------------------------

    async def get(self, instance_id: str) -> Instance | None:
        found, _ = await self.instances()
        return next((i for i in found if i.id == instance_id), None)

    async def instances(self, name: str | None = None) -> tuple[list[Instance], int]:
        if name is not None:
            index, entries = await self._call("health", self._consul.health.service(name))
            found = [_instance(e) for e in entries if _live(e)]
        else:
            index, services = await self._call("catalog", self._consul.catalog.services())
            found = []
            for service in sorted(services):
                _, entries = await self._call("health", self._consul.health.service(service))
                found += [_instance(e) for e in entries if _live(e)]
        found.sort(key=lambda i: i.id)
        return found, self._saw(index)

    @property
    def index(self) -> int:
        return self._index

    async def _current_index(self) -> int:
        index, _ = await self._call("catalog", self._consul.catalog.services())
        return self._saw(index)

    async def wait_for_index(self, index: int, timeout: float) -> int:
        """A blocking query on the catalog (its index moves with every write)."""
        seconds = max(1, round(timeout))
        index_now, _ = await self._call("catalog", self._consul.catalog.services(
            index=index, wait=f"{seconds}s"))
        return self._saw(index_now)

    async def watch(self, since: int = 0) -> AsyncIterator[Change]:
        known: dict[str, Instance] = {}
        position = since
        if since <= 0:
            snapshot, position = await self.instances()
            known = {i.id: i for i in snapshot}
            yield Change(position, "snapshot", tuple(snapshot))
        while True:
            try:
                index, _ = await self._call("watch", self._consul.catalog.services(
                    index=position, wait=WATCH_WAIT))
                if int(index) == position:
                    continue  # the wait ran out: nothing changed
                current, position = await self.instances()
            except RegistryUnavailable as exc:
                log.warning("event=watch-retry error=%s retry_in=%.1fs", exc, RETRY_DELAY)
                await asyncio.sleep(RETRY_DELAY)
                continue
            for change in changes_between(known, current, position):
                yield change
            known = {i.id: i for i in current}

    # -- KV --------------------------------------------------------------------

    async def kv_get(self, key: str) -> KVEntry | None:
        index, data = await self._call("kv get", self._consul.kv.get(key))
        self._saw(index)
        return _kv_entry(data) if data else None

    async def kv_list(self, prefix: str) -> tuple[list[KVEntry], int]:
        index, data = await self._call("kv list", self._consul.kv.get(prefix, recurse=True))
        entries = sorted((_kv_entry(d) for d in data or ()), key=lambda e: e.key)
        return entries, self._saw(index)

    async def kv_put(self, key: str, value: bytes, *, flags: int = 0,
                     cas: int | None = None) -> bool:
        done = await self._call("kv put", self._consul.kv.put(key, value, cas=cas,
                                                             flags=flags or None))
        await self._current_index()
        return bool(done)

    async def kv_delete(self, key: str, *, recurse: bool = False,
                        cas: int | None = None) -> bool:
        done = await self._call("kv delete", self._consul.kv.delete(
            key, recurse=recurse or None, cas=cas))
        await self._current_index()
        return bool(done)

    async def close(self) -> None:
        await self._consul.http.close()


def _kv_entry(data: dict[str, Any]) -> KVEntry:
    return KVEntry(data["Key"], data.get("Value") or b"", int(data.get("Flags", 0)),
                   int(data.get("CreateIndex", 0)), int(data.get("ModifyIndex", 0)))
