"""``etcd://HOST:PORT[,HOST:PORT...]/PREFIX``: the document in the etcd v3 key
``PREFIX/config``, as plain JSON (``etcdctl get`` shows it as it is).

Commits are a transaction comparing the key's mod revision (its version 0 while
it does not exist); the watch follows the key from the revision last read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions

from consulate.control.configurator.stores import (
    Conflict,
    Snapshot,
    StoreError,
    parse_document,
    pretty,
)
from consulate.control.error_text import error_text
from consulate.control.etcd_client import UNAVAILABLE, open_client

T = TypeVar("T")


class EtcdStore:
    def __init__(self, endpoints: Sequence[tuple[str, int]], prefix: str) -> None:
        self.key = f"/{prefix.strip('/')}/config".encode()
        where = ",".join(f"{h}:{p}" for h, p in endpoints)
        self.describe = f"etcd://{where}/{prefix.strip('/')}"
        self._client = open_client(endpoints)

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except UNAVAILABLE as exc:
            raise StoreError(f"KV store {self.describe} is not answering ({what}: "
                             f"{error_text(exc)}): start etcd there, or use a "
                             "file:// store") from None

    async def load(self) -> Snapshot:
        found = await self._call("read", self._client.get_prefix(self.key))
        revision = int(found.header.revision)
        for kv in found:
            if kv.key == self.key:
                return Snapshot(parse_document(kv.value, f"{self.describe} key "
                                               f"{self.key.decode()!r}"),
                                str(kv.mod_revision), revision)
        return Snapshot({}, "0", revision)

    async def save(self, document: Any, expected: Snapshot) -> Snapshot:
        txn = self._client.transactions
        condition = (txn.version(self.key) == 0 if expected.version == "0"
                     else txn.mod(self.key) == int(expected.version))
        ok, _ = await self._call("write", self._client.transaction(
            compare=[condition], success=[txn.put(self.key, pretty(document))], failure=[]))
        if not ok:
            raise Conflict(f"{self.describe} key {self.key.decode()!r} changed since it "
                           "was read")
        return await self.load()

    async def wait(self, seen: Snapshot, timeout: float) -> Snapshot:
        try:
            watch = await self._call("watch", self._client.watch(
                self.key, start_revision=seen.index + 1))
        except aetcd.exceptions.RevisionCompactedError:
            return await self.load()  # history before our position is gone: read it now
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    async for _event in watch:
                        break
        except aetcd.exceptions.RevisionCompactedError:
            pass  # as above
        except UNAVAILABLE as exc:
            raise StoreError(f"KV store {self.describe}: the watch broke "
                             f"({error_text(exc)})") from None
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()
        return await self.load()

    async def close(self) -> None:
        await self._client.close()
