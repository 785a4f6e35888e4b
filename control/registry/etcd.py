"""The etcd backend: the registry on an etcd v3 cluster, for more than one machine.

Layout under the prefix (default ``/consulate``)::

    <prefix>/instances/<service>/<id>   the instance, JSON (no indexes)
    <prefix>/ids/<id>                   its service name, to find it by id
    <prefix>/kv/<key>                   a KV entry: {"flags": N, "value": base64}

Both keys of an instance are written in one transaction and share its lease, so
a TTL instance vanishes whole when its heartbeats stop: etcd expires the lease,
not this process. The registry index is etcd's revision, which only grows and is
shared by every key, as the interface wants; an instance's ``create_index`` is
its key's create revision, kept across re-registrations (Discoverd's
registration age).

Watches follow the instances prefix by revision. When the stream breaks (a
member went away, the revision was compacted), the watcher reads the whole set
again and emits the difference as ``up``/``down`` changes, so a consumer never
keeps an instance that vanished meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rtypes

from consulate.control.error_text import error_text
from consulate.control.etcd_client import UNAVAILABLE, open_client
from consulate.control.registry.model import (
    Change,
    Instance,
    KVEntry,
    RegistryUnavailable,
    UnknownInstance,
    changes_between,
    instance_from_dict,
    instance_to_dict,
)

log = logging.getLogger("consulate.registry.etcd")

DEFAULT_PREFIX = "/consulate"
RECONNECT_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)  # then 2 s apart, while a watch is down

_INDEX_FIELDS = {"create_index", "modify_index"}


def _encode(instance: Instance) -> bytes:
    body = {k: v for k, v in instance_to_dict(instance).items() if k not in _INDEX_FIELDS}
    return json.dumps(body, sort_keys=True).encode()


def _decode(value: bytes, create_revision: int, mod_revision: int) -> Instance:
    return instance_from_dict(json.loads(value)).indexed(create_revision, mod_revision)


def _kv_entry(key: str, kv: Any) -> KVEntry:
    body = json.loads(kv.value)
    return KVEntry(key, base64.b64decode(body["value"]), int(body["flags"]),
                   int(kv.create_revision), int(kv.mod_revision))


class EtcdRegistry:
    """RegistryBackend on etcd v3 (gRPC), one or more members."""

    def __init__(self, endpoints: Sequence[tuple[str, int]], prefix: str = DEFAULT_PREFIX) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one HOST:PORT endpoint")
        self._where = ",".join(f"{host}:{port}" for host, port in endpoints)
        self._prefix = prefix.rstrip("/")
        self._client = open_client(endpoints)
        self._revision = 0

    def start(self) -> None:
        """Nothing to run here: etcd expires the leases of silent instances itself."""

    # -- keys ------------------------------------------------------------------

    def _instances_prefix(self, name: str | None = None) -> bytes:
        return f"{self._prefix}/instances/{name + '/' if name else ''}".encode()

    def _instance_key(self, name: str, instance_id: str) -> bytes:
        return f"{self._prefix}/instances/{name}/{instance_id}".encode()

    def _id_key(self, instance_id: str) -> bytes:
        return f"{self._prefix}/ids/{instance_id}".encode()

    def _kv_key(self, key: str) -> bytes:
        return f"{self._prefix}/kv/{key}".encode()

    # -- calls -------------------------------------------------------------------

    async def _call(self, what: str, call: Any) -> Any:
        """Run one etcd call; an unreachable cluster becomes RegistryUnavailable."""
        try:
            result = await call
        except UNAVAILABLE as exc:
            raise RegistryUnavailable(
                f"etcd at {self._where} is not answering ({what}: {error_text(exc)}):"
                " start it, or pass --registry embedded"
            ) from None
        header = getattr(result, "header", None)
        if header is not None:
            self._revision = max(self._revision, int(header.revision))
        return result

    async def _stored(self, instance_id: str) -> tuple[Instance, int] | None:
        """The instance with this id and the id of its lease (0: none), if held."""
        name_kv = await self._call("get", self._client.get(self._id_key(instance_id)))
        if name_kv is None:
            return None
        name = name_kv.value.decode()
        kv = await self._call("get", self._client.get(self._instance_key(name, instance_id)))
        if kv is None:
            return None
        return _decode(kv.value, kv.create_revision, kv.mod_revision), int(kv.lease)

    # -- mutations -------------------------------------------------------------

    async def register(self, instance: Instance) -> Instance:
        found = await self._stored(instance.id)
        if found is not None and found[0].same_registration(instance):
            old, lease_id = found
            if not lease_id or await self._renew(lease_id):
                return old
            found = None  # its lease ran out a moment ago: register it afresh
        lease = None
        if instance.ttl is not None:
            # etcd leases count whole seconds; round up so an instance never
            # expires before its TTL.
            lease = await self._call("lease", self._client.lease(math.ceil(instance.ttl)))
        txn = self._client.transactions
        ops = [txn.put(self._id_key(instance.id), instance.name.encode(), lease=lease),
               txn.put(self._instance_key(instance.name, instance.id), _encode(instance),
                       lease=lease)]
        if found is not None and found[0].name != instance.name:
            ops.append(txn.delete(self._instance_key(found[0].name, instance.id)))
        await self._call("register", self._client.transaction(compare=[], success=ops, failure=[]))
        if found is not None and found[1]:
            with contextlib.suppress(*UNAVAILABLE, aetcd.exceptions.ClientError):
                await self._client.revoke_lease(found[1])  # holds no key any more
        stored = await self._stored(instance.id)
        if stored is None:  # expired or removed in between: report what was written
            raise UnknownInstance(instance.id)
        log.info("event=register id=%s service=%s address=%s:%d index=%d", instance.id,
                 instance.name, instance.address, instance.port, stored[0].modify_index)
        return stored[0]

    async def deregister(self, instance_id: str) -> int:
        found = await self._stored(instance_id)
        if found is None:
            raise UnknownInstance(instance_id)
        instance, lease_id = found
        txn = self._client.transactions
        await self._call("deregister", self._client.transaction(compare=[], failure=[], success=[
            txn.delete(self._id_key(instance_id)),
            txn.delete(self._instance_key(instance.name, instance_id)),
        ]))
        if lease_id:
            with contextlib.suppress(*UNAVAILABLE, aetcd.exceptions.ClientError):
                await self._client.revoke_lease(lease_id)
        index = await self._current_revision()  # a transaction's reply carries none
        log.info("event=deregister id=%s service=%s index=%d", instance_id, instance.name,
                 index)
        return index

    async def heartbeat(self, instance_id: str) -> None:
        found = await self._stored(instance_id)
        if found is None:
            raise UnknownInstance(instance_id)
        if found[1] and not await self._renew(found[1]):
            raise UnknownInstance(instance_id)  # expired; its keys are about to go

    async def _renew(self, lease_id: int) -> bool:
        """Refresh a lease; False when it has run out. etcd answers a keep-alive for an
        expired lease with TTL 0 rather than an error, while the keys may still be
        there until the expiry is applied: a caller must not take that as renewed."""
        reply = await self._call("refresh", self._client.refresh_lease(lease_id))
        return int(getattr(reply, "TTL", 0)) > 0

    # -- KV --------------------------------------------------------------------

    async def kv_get(self, key: str) -> KVEntry | None:
        kv = await self._call("kv get", self._client.get(self._kv_key(key)))
        return _kv_entry(key, kv) if kv is not None else None

    async def kv_list(self, prefix: str) -> tuple[list[KVEntry], int]:
        base = len(self._kv_key(""))
        result = await self._call("kv list", self._client.get_prefix(self._kv_key(prefix)))
        entries = sorted((_kv_entry(kv.key[base:].decode(), kv) for kv in result),
                         key=lambda e: e.key)
        return entries, int(result.header.revision)

    async def kv_put(self, key: str, value: bytes, *, flags: int = 0,
                     cas: int | None = None) -> bool:
        body = json.dumps({"flags": flags, "value": base64.b64encode(value).decode()}).encode()
        txn = self._client.transactions
        ok, _ = await self._call("kv put", self._client.transaction(
            compare=self._cas(key, cas), success=[txn.put(self._kv_key(key), body)],
            failure=[]))
        await self._current_revision()
        return bool(ok)

    async def kv_delete(self, key: str, *, recurse: bool = False,
                        cas: int | None = None) -> bool:
        if recurse and cas is None:
            await self._call("kv delete", self._client.delete_prefix(self._kv_key(key)))
            await self._current_revision()
            return True
        txn = self._client.transactions
        ok, _ = await self._call("kv delete", self._client.transaction(
            compare=self._cas(key, cas), success=[txn.delete(self._kv_key(key))], failure=[]))
        await self._current_revision()
        return bool(ok)

    def _cas(self, key: str, cas: int | None) -> list[Any]:
        """The transaction's condition: absent for cas=0, modified at ``cas`` otherwise."""
        txn = self._client.transactions
        if cas is None:
            return []
        if cas == 0:
            return [txn.version(self._kv_key(key)) == 0]
        return [txn.mod(self._kv_key(key)) == cas]

    # -- reads -----------------------------------------------------------------

    async def get(self, instance_id: str) -> Instance | None:
        found = await self._stored(instance_id)
        return found[0] if found is not None else None

    async def instances(self, name: str | None = None) -> tuple[list[Instance], int]:
        result = await self._call("list", self._client.get_prefix(self._instances_prefix(name)))
        found = [_decode(kv.value, kv.create_revision, kv.mod_revision) for kv in result]
        found.sort(key=lambda i: i.id)
        return found, int(result.header.revision)

    @property
    def index(self) -> int:
        return self._revision

    async def wait_for_index(self, index: int, timeout: float) -> int:
        """Block until anything of this registry (instances or KV) changes after
        ``index``, or ``timeout``; returns the revision."""
        if await self._current_revision() > index:
            return self._revision
        watch = await self._call("watch", self._client.watch_prefix(
            f"{self._prefix}/".encode(), start_revision=index + 1))
        try:
            with contextlib.suppress(TimeoutError, *UNAVAILABLE):
                async with asyncio.timeout(timeout):
                    async for event in watch:
                        self._revision = max(self._revision, int(event.kv.mod_revision))
                        break
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()
        return self._revision

    async def _current_revision(self) -> int:
        """etcd's revision now (read with an empty range: no data moves)."""
        await self._call("revision", self._client.get_prefix(
            f"{self._prefix}/revision".encode(), keys_only=True))
        return self._revision

    async def watch(self, since: int = 0) -> AsyncIterator[Change]:
        known: dict[str, Instance] = {}
        position = since
        if since <= 0:
            snapshot, position = await self.instances()
            known = {i.id: i for i in snapshot}
            yield Change(position, "snapshot", tuple(snapshot))
        failures = 0
        while True:
            try:
                async for change in self._follow(position, known):
                    failures = 0
                    position = change.index
                    yield change
            except aetcd.exceptions.RevisionCompactedError:
                log.warning("event=watch-resync reason=compacted since=%d", position)
            except (*UNAVAILABLE, RegistryUnavailable) as exc:
                await self._back_off(failures, exc)
                failures += 1
            # Whatever broke the stream, read the set again and emit the difference,
            # and follow again only from where a read that got through says: etcd
            # back without its data counts its revisions from 1 again, and a watch
            # from the old position would wait for a revision that comes much later.
            while True:
                try:
                    changes, position = await self._resync(known)
                    break
                except RegistryUnavailable as exc:
                    await self._back_off(failures, exc)
                    failures += 1
            for change in changes:
                yield change

    async def _back_off(self, failures: int, exc: Exception) -> None:
        """Log why the watch is down and wait before its next attempt."""
        delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
        log.warning("event=watch-reconnect etcd=%s error=%r retry_in=%.1fs",
                    self._where, error_text(exc), delay)
        await asyncio.sleep(delay)

    async def _follow(self, position: int, known: dict[str, Instance]) -> AsyncIterator[Change]:
        watch = await self._call("watch", self._client.watch_prefix(
            self._instances_prefix(), start_revision=position + 1, prev_kv=True))
        try:
            async for event in watch:
                kv = event.kv
                revision = int(kv.mod_revision)
                self._revision = max(self._revision, revision)
                if event.kind == aetcd.rtypes.EventKind.PUT:
                    instance = _decode(kv.value, kv.create_revision, kv.mod_revision)
                    known[instance.id] = instance
                    yield Change(revision, "up", (instance,))
                    continue
                instance_id = kv.key.decode().rsplit("/", 1)[-1]
                gone = known.pop(instance_id, None)
                if gone is None and event.prev_kv is not None:
                    gone = _decode(event.prev_kv.value, event.prev_kv.create_revision,
                                   event.prev_kv.mod_revision)
                if gone is not None:
                    yield Change(revision, "down", (gone,))
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()

    async def _resync(self, known: dict[str, Instance]) -> tuple[list[Change], int]:
        """The changes that turn ``known`` into the current set (which it becomes)."""
        current, revision = await self.instances()
        if revision < self._revision:  # etcd is back without its data: count from there
            log.warning("event=revision-reset etcd=%s from=%d to=%d", self._where,
                        self._revision, revision)
            self._revision = revision
        changes = changes_between(known, current, revision)
        known.clear()
        known.update((i.id, i) for i in current)
        return changes, revision

    async def close(self) -> None:
        await self._client.close()
