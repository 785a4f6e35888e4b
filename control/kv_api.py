"""Consul's KV endpoints, as Consul documents them, on the agent's HTTP server.

    GET    /v1/kv/<key>   [?recurse] [?keys[&separator=/]] [?raw] [?index=&wait=]
    PUT    /v1/kv/<key>   [?flags=N] [?cas=M]   body: the raw value   -> true|false
    DELETE /v1/kv/<key>   [?recurse] [?cas=M]                         -> true|false

Values travel base64-encoded in JSON, raw with ``?raw`` and in PUT bodies.
``cas=0`` writes only if the key does not exist: with the registry's
compare-and-set underneath, that is enough for leader election.
"""

from __future__ import annotations

import base64
import re

from aiohttp import web

from consulate.control.api_context import indexed_json, wait_past
from consulate.control.registry.backend import RegistryBackend
from consulate.control.registry.model import KVEntry

MAX_VALUE = 512 * 1024  # Consul's limit on a KV value
MAX_KEY = 512
_KEY = re.compile(r"^[\x21-\x7e]*$")  # printable ASCII, no spaces: keys are paths in URLs


def entry_json(entry: KVEntry) -> dict[str, object]:
    return {"LockIndex": 0, "Key": entry.key, "Flags": entry.flags,
            "Value": base64.b64encode(entry.value).decode() if entry.value else None,
            "CreateIndex": entry.create_index, "ModifyIndex": entry.modify_index}


def _key(request: web.Request) -> str:
    key = request.match_info["key"]
    if len(key) > MAX_KEY or not _KEY.match(key):
        raise web.HTTPBadRequest(text=f"key {key[:64]!r}: use up to {MAX_KEY} printable "
                                      "ASCII characters without spaces")
    return key


def _number(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) >= 2**64:
        raise web.HTTPBadRequest(text=f"{name} {text!r} must be an unsigned 64-bit integer")
    return int(text)


class _KV:
    def __init__(self, registry: RegistryBackend) -> None:
        self.registry = registry

    async def get(self, request: web.Request) -> web.Response:
        key = _key(request)
        await wait_past(self.registry, request)
        if "recurse" in request.query or "keys" in request.query:
            entries, index = await self.registry.kv_list(key)
            if not entries:
                raise _not_found(index)
            if "keys" in request.query:
                return indexed_json(_keys(entries, key, request.query.get("separator", "")), index)
            return indexed_json([entry_json(e) for e in entries], index)
        entry = await self.registry.kv_get(key)
        if entry is None:
            raise _not_found(self.registry.index)
        if "raw" in request.query:
            return web.Response(body=entry.value, content_type="application/octet-stream",
                                headers={"X-Consul-Index": str(entry.modify_index)})
        return indexed_json([entry_json(entry)], entry.modify_index)

    async def put(self, request: web.Request) -> web.Response:
        key = _key(request)
        if not key:
            raise web.HTTPBadRequest(text="Missing key name: PUT /v1/kv/<key>")
        flags, cas = _number(request, "flags"), _number(request, "cas")
        if (request.content_length or 0) > MAX_VALUE:  # refused before it is read, as Consul
            raise _too_large(request.content_length or 0)
        value = await request.read()
        if len(value) > MAX_VALUE:  # a chunked body says its size only once read
            raise _too_large(len(value))
        done = await self.registry.kv_put(key, value, flags=flags or 0, cas=cas)
        return web.json_response(done)

    async def delete(self, request: web.Request) -> web.Response:
        key = _key(request)
        recurse = "recurse" in request.query
        if not key and not recurse:
            raise web.HTTPBadRequest(text="Missing key name: DELETE /v1/kv/<key>")
        done = await self.registry.kv_delete(key, recurse=recurse, cas=_number(request, "cas"))
        return web.json_response(done)


def _keys(entries: list[KVEntry], prefix: str, separator: str) -> list[str]:
    """Key names under ``prefix``, cut after the first ``separator`` past it (a folder)."""
    found: list[str] = []
    for entry in entries:
        name = entry.key
        if separator:
            cut = name.find(separator, len(prefix))
            if cut >= 0:
                name = name[:cut + len(separator)]
        if not found or found[-1] != name:
            found.append(name)
    return found


def _too_large(size: int) -> web.HTTPRequestEntityTooLarge:
    """Consul's answer to a value over its ``kv_max_value_size``."""
    return web.HTTPRequestEntityTooLarge(
        max_size=MAX_VALUE, actual_size=size,
        text=f"Request body({size} bytes) too large, max size: {MAX_VALUE} bytes "
             "(Consul's kv_max_value_size)")


def _not_found(index: int) -> web.HTTPNotFound:
    return web.HTTPNotFound(headers={"X-Consul-Index": str(max(index, 1))})


def add_routes(app: web.Application, registry: RegistryBackend) -> None:
    handlers = _KV(registry)
    app.router.add_get("/v1/kv/{key:.*}", handlers.get)
    app.router.add_put("/v1/kv/{key:.*}", handlers.put)
    app.router.add_delete("/v1/kv/{key:.*}", handlers.delete)
