"""Where the document lives: the interface of every store, and the file store.

A store holds one JSON document under a version. ``save`` is a compare-and-set
on that version (Conflict when someone else wrote in between: the caller
re-applies its edit to the fresh document and tries again), and ``wait`` is a
blocking watch, as Consul's blocking queries are.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from consulate.control.configurator.target import fsync_directory, write_beside


class StoreError(Exception):
    """The store cannot be used now; the message names it and what to do."""


class Conflict(StoreError):
    """The document changed since it was read: read it again and retry the edit."""


@dataclass(frozen=True)
class Snapshot:
    document: Any
    version: str  # what save() compares with: a content hash, a ModifyIndex, a revision
    index: int = 0  # the watch position (Consul's X-Consul-Index, etcd's revision)


class Store(Protocol):
    describe: str

    async def load(self) -> Snapshot: ...

    async def save(self, document: Any, expected: Snapshot) -> Snapshot:
        """Write ``document`` if the stored version is still ``expected``'s."""
        ...

    async def wait(self, seen: Snapshot, timeout: float) -> Snapshot:
        """The document once its version differs from ``seen``'s, or after ``timeout``."""
        ...

    async def close(self) -> None: ...


MAX_DEPTH = 64  # arrays and objects inside each other; nginx's deepest block is ~6
TOO_DEEP = f"nests arrays and objects more than {MAX_DEPTH} levels deep"


def too_deep(document: Any) -> bool:
    """Whether ``document`` nests more than MAX_DEPTH arrays and objects. Macros and
    transformers walk a document recursively: one from a client or a store must
    be refused with a message before it runs them out of stack (a 500)."""
    stack = [(document, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth >= MAX_DEPTH:
                return True
            stack.extend((child, depth + 1)
                         for child in (node.values() if isinstance(node, dict) else node))
    return False


def parse_document(raw: bytes, where: str) -> Any:
    try:
        document = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{where} does not hold JSON ({exc}): fix or remove it") from None
    except RecursionError:  # deeper than the JSON parser itself goes
        raise StoreError(f"{where} {TOO_DEEP}: flatten it") from None
    if too_deep(document):
        raise StoreError(f"{where} {TOO_DEEP}: flatten it")
    return document


def pretty(document: Any) -> bytes:
    """How every store writes the document: indented, keys in the document's order."""
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()


FILE_POLL = 0.5  # seconds between looks at a watched file


class FileStore:
    """``file://PATH``: the document is a JSON file, written back pretty on commit."""

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()
        self.describe = f"file://{self.path}"
        self._lock = asyncio.Lock()

    def _read(self) -> tuple[bytes | None, str]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, ""
        except OSError as exc:
            raise StoreError(f"{self.describe} cannot be read ({exc.strerror}): check its "
                             "permissions") from None
        return raw, hashlib.sha256(raw).hexdigest()

    async def load(self) -> Snapshot:
        raw, version = self._read()
        return Snapshot(parse_document(raw or b"", self.describe), version)

    async def save(self, document: Any, expected: Snapshot) -> Snapshot:
        async with self._lock:
            if self._read()[1] != expected.version:
                raise Conflict(f"{self.describe} changed since it was read")
            body = pretty(document)
            await asyncio.to_thread(self._write, body)
            return Snapshot(document, hashlib.sha256(body).hexdigest())

    def _write(self, body: bytes) -> None:
        os.replace(write_beside(self.path, body), self.path)
        fsync_directory(self.path.parent)

    async def wait(self, seen: Snapshot, timeout: float) -> Snapshot:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self._read()[1] != seen.version:
                return await self.load()
            await asyncio.sleep(FILE_POLL)
        return seen

    async def close(self) -> None:
        """Nothing held open between calls."""
