"""The interface every registry backend implements: instances with TTLs, watches, KV."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from consulate.control.registry.model import Change, Instance, KVEntry


class RegistryBackend(Protocol):
    """Source of truth for service instances.

    Every mutation returns the registry index it produced; indexes only grow and
    are shared by all services, as Consul's raft index and etcd's revision are.
    """

    def start(self) -> None:
        """Start background work (the embedded backend's TTL reaper); call in a loop."""
        ...

    async def register(self, instance: Instance) -> Instance:
        """Store (or replace, by id) an instance; returns it with its indexes set."""
        ...

    async def deregister(self, instance_id: str) -> int:
        """Remove an instance; raises UnknownInstance when the id is not held."""
        ...

    async def heartbeat(self, instance_id: str) -> None:
        """Renew an instance's TTL; raises UnknownInstance when the id is not held."""
        ...

    async def get(self, instance_id: str) -> Instance | None: ...

    async def instances(self, name: str | None = None) -> tuple[list[Instance], int]:
        """Live instances (of one service, or all) ordered by id, and the current index."""
        ...

    @property
    def index(self) -> int:
        """The registry's current index."""
        ...

    async def wait_for_index(self, index: int, timeout: float) -> int:
        """Block until the index passes ``index`` or ``timeout`` runs out (blocking queries)."""
        ...

    def watch(self, since: int = 0) -> AsyncIterator[Change]:
        """Changes after ``since``: a snapshot first unless they can be replayed."""
        ...

    async def kv_get(self, key: str) -> KVEntry | None: ...

    async def kv_list(self, prefix: str) -> tuple[list[KVEntry], int]:
        """Entries whose key starts with ``prefix``, by key, and the current index."""
        ...

    async def kv_put(self, key: str, value: bytes, *, flags: int = 0,
                     cas: int | None = None) -> bool:
        """Store ``value``; with ``cas`` only if the key's modify index is ``cas`` (0: only
        if absent). False when the condition failed: the compare-and-set of leadership."""
        ...

    async def kv_delete(self, key: str, *, recurse: bool = False,
                        cas: int | None = None) -> bool:
        """Delete a key (every key under it with ``recurse``); ``cas`` as for kv_put."""
        ...

    async def close(self) -> None: ...
