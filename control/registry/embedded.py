"""The embedded registry: in process, persisted in SQLite (WAL), TTLs reaped here.

All reads are served from memory; SQLite is the durable copy, written in the same
call as the memory update so a crash never loses an acknowledged registration.
The writes are small single-row transactions on a local file (tens of
microseconds in WAL mode), so they run on the event loop rather than paying a
thread hop per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

from consulate.control.registry.model import (
    Change,
    Instance,
    KVEntry,
    UnknownInstance,
    instance_from_dict,
    instance_to_dict,
)
from consulate.control.tasks import cancel_and_wait

log = logging.getLogger("consulate.registry")

# How many changes are kept for replay to watchers that reconnect with an index;
# an older index gets a fresh snapshot instead (etcd's compaction, in miniature).
CHANGE_LOG_LENGTH = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    expires_at REAL
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    flags INTEGER NOT NULL,
    create_index INTEGER NOT NULL,
    modify_index INTEGER NOT NULL
);
"""


def _to_row(instance: Instance) -> str:
    return json.dumps(instance_to_dict(instance), sort_keys=True)


def _from_row(body: str) -> Instance:
    return instance_from_dict(json.loads(body))


class EmbeddedRegistry:
    """The default backend: one SQLite file under the agent's data directory."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._instances: dict[str, Instance] = {}
        self._expires: dict[str, float] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._log: deque[Change] = deque(maxlen=CHANGE_LOG_LENGTH)
        self._changed = asyncio.Condition()
        self._reaper: asyncio.Task[None] | None = None
        self._wake_reaper = asyncio.Event()
        for instance_id, body, expires_at in self._db.execute(
            "SELECT id, body, expires_at FROM instances"
        ):
            self._instances[instance_id] = _from_row(body)
            if expires_at is not None:
                self._set_deadline(instance_id, expires_at)
        self._kv: dict[str, KVEntry] = {
            key: KVEntry(key, bytes(value), flags, create_index, modify_index)
            for key, value, flags, create_index, modify_index in self._db.execute(
                "SELECT key, value, flags, create_index, modify_index FROM kv")
        }
        row = self._db.execute("SELECT value FROM state WHERE key = 'index'").fetchone()
        # A new registry starts at index 1, as etcd does: the API never says 0 (Consul's
        # rule), so no write may get the index an empty registry answers with.
        self._index: int = row[0] if row else 1
        # Every instance change after this index is in the log (KV writes, which
        # move the index too, are not instance changes).
        self._log_start = self._index

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start reaping expired TTLs (instances that outlived a restart expire too)."""
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def close(self) -> None:
        if self._reaper is not None:
            await cancel_and_wait(self._reaper)
            self._reaper = None
        self._db.close()

    # -- mutations -------------------------------------------------------------

    async def register(self, instance: Instance) -> Instance:
        old = self._instances.get(instance.id)
        if old is not None and old.same_registration(instance):
            if instance.ttl is not None:
                self._renew(instance.id, instance.ttl)
            return old
        index = self._next_index()
        stored = instance.indexed(old.create_index if old else index, index)
        expires_at = time.time() + stored.ttl if stored.ttl is not None else None
        self._db.execute(
            "INSERT OR REPLACE INTO instances (id, body, expires_at) VALUES (?, ?, ?)",
            (stored.id, _to_row(stored), expires_at),
        )
        self._save_index()
        self._instances[stored.id] = stored
        self._expires.pop(stored.id, None)
        if expires_at is not None:
            self._set_deadline(stored.id, expires_at)
        log.info(
            "event=register id=%s service=%s address=%s:%d index=%d",
            stored.id, stored.name, stored.address, stored.port, index,
        )
        await self._publish(Change(index, "up", (stored,)))
        return stored

    async def deregister(self, instance_id: str) -> int:
        if instance_id not in self._instances:
            raise UnknownInstance(instance_id)
        return await self._remove(instance_id, reason="deregister")

    async def heartbeat(self, instance_id: str) -> None:
        instance = self._instances.get(instance_id)
        if instance is None:
            raise UnknownInstance(instance_id)
        if instance.ttl is not None:
            self._renew(instance_id, instance.ttl)

    # -- KV --------------------------------------------------------------------

    async def kv_get(self, key: str) -> KVEntry | None:
        return self._kv.get(key)

    async def kv_list(self, prefix: str) -> tuple[list[KVEntry], int]:
        found = sorted((e for k, e in self._kv.items() if k.startswith(prefix)),
                       key=lambda e: e.key)
        return found, self._index

    async def kv_put(self, key: str, value: bytes, *, flags: int = 0,
                     cas: int | None = None) -> bool:
        old = self._kv.get(key)
        if cas is not None and (old.modify_index if old else 0) != cas:
            return False
        index = self._next_index()
        entry = KVEntry(key, value, flags, old.create_index if old else index, index)
        self._db.execute(
            "INSERT OR REPLACE INTO kv (key, value, flags, create_index, modify_index) "
            "VALUES (?, ?, ?, ?, ?)",
            (key, value, flags, entry.create_index, index))
        self._save_index()
        self._kv[key] = entry
        await self._wake()
        return True

    async def kv_delete(self, key: str, *, recurse: bool = False,
                        cas: int | None = None) -> bool:
        if cas is not None:
            old = self._kv.get(key)
            if (old.modify_index if old else 0) != cas:
                return False
        doomed = [k for k in self._kv if k.startswith(key)] if recurse else (
            [key] if key in self._kv else [])
        if not doomed:
            return True  # deleting nothing succeeds, as in Consul
        self._next_index()
        self._db.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in doomed])
        self._save_index()
        for k in doomed:
            del self._kv[k]
        await self._wake()
        return True

    # -- reads -----------------------------------------------------------------

    async def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    async def instances(self, name: str | None = None) -> tuple[list[Instance], int]:
        found = [i for i in self._instances.values() if name is None or i.name == name]
        found.sort(key=lambda i: i.id)
        return found, self._index

    @property
    def index(self) -> int:
        return self._index

    async def wait_for_index(self, index: int, timeout: float) -> int:
        """Block until the registry index passes ``index`` or ``timeout`` runs out."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that races with the inner wait finishing (gh-86296).
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(functools.partial(self._passed, index))
        return self._index

    async def watch(self, since: int = 0) -> AsyncIterator[Change]:
        position = since
        if since <= 0 or not self._can_replay(position):
            snapshot, position = await self.instances()
            yield Change(position, "snapshot", tuple(snapshot))
        while True:
            async with self._changed:
                await self._changed.wait_for(functools.partial(self._passed, position))
                replayable = self._can_replay(position)
                pending = [c for c in self._log if c.index > position] if replayable else []
                reached = self._index
            if not replayable:
                snapshot, position = await self.instances()
                yield Change(position, "snapshot", tuple(snapshot))
                continue
            for change in pending:
                yield change
            position = reached  # KV writes move the index too: nothing to send for them

    # -- internals -------------------------------------------------------------

    def _passed(self, index: int) -> bool:
        return self._index > index

    def _can_replay(self, since: int) -> bool:
        if since < 0:
            return False
        if since > self._index:  # the consumer saw a registry that was reset
            return False
        return since >= self._log_start

    def _next_index(self) -> int:
        self._index += 1
        return self._index

    def _save_index(self) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO state (key, value) VALUES ('index', ?)", (self._index,)
        )

    async def _publish(self, change: Change) -> None:
        if len(self._log) == self._log.maxlen:
            self._log_start = self._log[0].index  # changes up to it can no longer be replayed
        self._log.append(change)
        await self._wake()

    async def _wake(self) -> None:
        """Wake blocking queries and watches: the index moved."""
        async with self._changed:
            self._changed.notify_all()

    async def _remove(self, instance_id: str, reason: str) -> int:
        instance = self._instances.pop(instance_id)
        self._expires.pop(instance_id, None)
        index = self._next_index()
        self._db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
        self._save_index()
        log.info(
            "event=%s id=%s service=%s index=%d", reason, instance_id, instance.name, index
        )
        await self._publish(Change(index, "down", (instance,)))
        return index

    def _renew(self, instance_id: str, ttl: float) -> None:
        expires_at = time.time() + ttl
        self._db.execute(
            "UPDATE instances SET expires_at = ? WHERE id = ?", (expires_at, instance_id)
        )
        self._set_deadline(instance_id, expires_at)

    def _set_deadline(self, instance_id: str, expires_at: float) -> None:
        self._expires[instance_id] = expires_at
        heapq.heappush(self._deadlines, (expires_at, instance_id))
        self._wake_reaper.set()

    async def _reap_forever(self) -> None:
        while True:
            now = time.time()
            while self._deadlines and self._deadlines[0][0] <= now:
                expires_at, instance_id = heapq.heappop(self._deadlines)
                # Entries are superseded lazily: only the latest deadline counts.
                if self._expires.get(instance_id) == expires_at:
                    await self._remove(instance_id, reason="expire")
            delay = self._deadlines[0][0] - now if self._deadlines else 3600.0
            self._wake_reaper.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake_reaper.wait()
