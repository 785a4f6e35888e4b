"""``consul://HOST:PORT/PREFIX`` and ``consulate://HOST:PORT/PREFIX``: the document in
a Consul KV key, ``PREFIX/config``, through py-consul's asyncio client.

consulate's agent serves the same KV API (``/v1/kv``) as Consul, so both schemes
are this one store. Commits are a check-and-set on the key's ModifyIndex (``cas=0``
while it does not exist); the watch is a blocking query on the key.
"""

from __future__ import annotations

import warnings
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp
import consul
import consul.aio

from consulate.control.configurator.stores import (
    Conflict,
    Snapshot,
    StoreError,
    parse_document,
    pretty,
)
from consulate.control.error_text import error_text

T = TypeVar("T")


class ConsulKVStore:
    def __init__(self, scheme: str, host: str, port: int, prefix: str) -> None:
        self.key = f"{prefix.strip('/')}/config"
        self.describe = f"{scheme}://{host}:{port}/{prefix.strip('/')}"
        with warnings.catch_warnings():
            # py-consul's asyncio client hands aiohttp its deprecated verify_ssl
            # argument; nothing of TLS is used here.
            warnings.filterwarnings("ignore", "(verify_ssl|ssl_context) is deprecated",
                                    DeprecationWarning)
            self._consul = consul.aio.Consul(host=host, port=port)

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except (aiohttp.ClientError, OSError, consul.Timeout, consul.ConsulException) as exc:
            raise StoreError(f"KV store {self.describe} is not answering ({what}: "
                             f"{error_text(exc)}): start the agent there, or "
                             "use a file:// store") from None

    def _snapshot(self, index: Any, data: dict[str, Any] | None) -> Snapshot:
        if data is None:
            return Snapshot({}, "0", int(index or 0))
        return Snapshot(parse_document(data.get("Value") or b"", f"{self.describe} "
                                       f"key {self.key!r}"),
                        str(data["ModifyIndex"]), int(index or 0))

    async def load(self) -> Snapshot:
        index, data = await self._call("read", self._consul.kv.get(self.key))
        return self._snapshot(index, data)

    async def save(self, document: Any, expected: Snapshot) -> Snapshot:
        done = await self._call("write", self._consul.kv.put(
            self.key, pretty(document), cas=int(expected.version)))
        if not done:
            raise Conflict(f"{self.describe} key {self.key!r} changed since it was read")
        return await self.load()

    async def wait(self, seen: Snapshot, timeout: float) -> Snapshot:
        index, data = await self._call("watch", self._consul.kv.get(
            self.key, index=seen.index, wait=f"{max(1, round(timeout))}s"))
        return self._snapshot(index, data)

    async def close(self) -> None:
        await self._consul.http.close()
