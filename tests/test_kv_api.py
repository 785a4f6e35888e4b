"""Consul's KV endpoints on consulate's API, driven by raw HTTP and by py-consul.

There is no Consul server here: py-consul, unmodified, talks to consulate's own
Consul-compatible API (a real aiohttp server on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import consul
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from consulate.control.api_context import ApiContext
from consulate.control.http_api import build_app
from consulate.control.registry import EmbeddedRegistry


def _context(registry: EmbeddedRegistry) -> ApiContext:
    return ApiContext(registry, node="n1", node_address="192.0.2.1", datacenter="dc1",
                      leader="192.0.2.1:8500", self_info=dict)


@pytest.fixture
async def client(registry: EmbeddedRegistry) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    async with TestClient(TestServer(build_app(_context(registry)))) as running:
        yield running


async def test_put_get_raw_and_flags(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.put("/v1/kv/app/config?flags=7", data=b"\x00\xffbinary")
    assert (response.status, await response.json()) == (200, True)
    response = await client.get("/v1/kv/app/config")
    [entry] = await response.json()
    assert entry == {"LockIndex": 0, "Key": "app/config", "Flags": 7,
                     "Value": base64.b64encode(b"\x00\xffbinary").decode(),
                     "CreateIndex": 2, "ModifyIndex": 2}
    assert response.headers["X-Consul-Index"] == "2"
    raw = await client.get("/v1/kv/app/config?raw")
    assert await raw.read() == b"\x00\xffbinary"


async def test_recurse_keys_and_separator(client: TestClient) -> None:  # type: ignore[type-arg]
    for key in ("app/a", "app/db/url", "app/db/user", "other"):
        await client.put(f"/v1/kv/{key}", data=key.encode())
    listed = await (await client.get("/v1/kv/app/?recurse")).json()
    assert [e["Key"] for e in listed] == ["app/a", "app/db/url", "app/db/user"]
    keys = await (await client.get("/v1/kv/app/?keys&separator=/")).json()
    assert keys == ["app/a", "app/db/"]
    assert (await client.get("/v1/kv/missing")).status == 404
    assert (await client.get("/v1/kv/missing/?recurse")).status == 404


async def test_cas_and_delete(client: TestClient) -> None:  # type: ignore[type-arg]
    assert await (await client.put("/v1/kv/lock?cas=0", data=b"a")).json() is True
    assert await (await client.put("/v1/kv/lock?cas=0", data=b"b")).json() is False
    assert await (await client.put("/v1/kv/lock?cas=99", data=b"c")).json() is False
    assert await (await client.delete("/v1/kv/lock?cas=99")).json() is False
    assert await (await client.delete("/v1/kv/lock?cas=2")).json() is True
    await client.put("/v1/kv/tree/a", data=b"1")
    await client.put("/v1/kv/tree/b", data=b"2")
    assert await (await client.delete("/v1/kv/tree/?recurse")).json() is True
    assert (await client.get("/v1/kv/tree/?recurse")).status == 404


async def test_blocking_get_returns_on_a_write(client: TestClient) -> None:  # type: ignore[type-arg]
    await client.put("/v1/kv/watched", data=b"1")
    index = (await client.get("/v1/kv/watched")).headers["X-Consul-Index"]
    poll = asyncio.ensure_future(client.get(f"/v1/kv/watched?index={index}&wait=30s"))
    await asyncio.sleep(0.1)
    assert not poll.done()
    await client.put("/v1/kv/watched", data=b"2")
    response = await asyncio.wait_for(poll, 5)
    [entry] = await response.json()
    assert base64.b64decode(entry["Value"]) == b"2"
    assert int(response.headers["X-Consul-Index"]) > int(index)


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("PUT", "/v1/kv/with%20space", b"x", 400, "printable ASCII characters without spaces"),
    ("PUT", "/v1/kv/k?flags=-1", b"x", 400, "flags '-1' must be an unsigned 64-bit integer"),
    ("PUT", "/v1/kv/k?cas=abc", b"x", 400, "cas 'abc' must be an unsigned 64-bit integer"),
    ("PUT", "/v1/kv/k", b"x" * (512 * 1024 + 1), 413,
     "Request body(524289 bytes) too large, max size: 524288 bytes (Consul's "
     "kv_max_value_size)"),
    ("PUT", "/v1/kv/", b"x", 400, "Missing key name"),
    ("DELETE", "/v1/kv/", None, 400, "Missing key name"),
    ("GET", "/v1/kv/k?index=x", None, 400, "index 'x' must be a non-negative integer"),
])
async def test_bad_requests_say_why_and_store_nothing(
    client: TestClient, registry: EmbeddedRegistry,  # type: ignore[type-arg]
    method: str, path: str, body: bytes | None, status: int, message: str,
) -> None:
    response = await client.request(method, path, data=body)
    assert response.status == status
    assert message in await response.text()
    assert (await registry.kv_list(""))[0] == []


def _py_consul_kv(port: int) -> dict[str, Any]:
    with consul.Consul(host="127.0.0.1", port=port) as c:
        seen: dict[str, Any] = {}
        seen["put"] = c.kv.put("service/web/config", "v1", flags=3)
        seen["cas_fail"] = c.kv.put("service/web/config", "v2", cas=0)
        index, data = c.kv.get("service/web/config")
        seen["get"] = (data["Value"], data["Flags"], int(index) > 0)
        seen["cas_ok"] = c.kv.put("service/web/config", "v2", cas=data["ModifyIndex"])
        _, listed = c.kv.get("service/", recurse=True)
        seen["recurse"] = [(e["Key"], e["Value"]) for e in listed]
        _, seen["keys"] = c.kv.get("service/", keys=True, separator="/")
        seen["delete"] = c.kv.delete("service/", recurse=True)
        seen["missing"] = c.kv.get("service/web/config")[1]
        return seen


async def test_py_consul_kv(registry: EmbeddedRegistry) -> None:
    runner = web.AppRunner(build_app(_context(registry)), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        seen = await asyncio.wait_for(
            asyncio.to_thread(_py_consul_kv, runner.addresses[0][1]), 10)
    finally:
        await runner.cleanup()
    assert seen == {
        "put": True, "cas_fail": False, "get": (b"v1", 3, True), "cas_ok": True,
        "recurse": [("service/web/config", b"v2")], "keys": ["service/web/"],
        "delete": True, "missing": None,
    }


# -- found by make fuzz -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [("flags", "²"), ("cas", "⁰")])
async def test_numbers_of_other_digits_are_400_and_store_nothing(
        client: TestClient, name: str, value: str) -> None:  # type: ignore[type-arg]
    """str.isdigit() holds for superscripts, which int() refuses (a 500 before)."""
    response = await client.put(f"/v1/kv/k?{name}={value}", data=b"v")
    assert (response.status, await response.text()) == (
        400, f"{name} {value!r} must be an unsigned 64-bit integer")
    assert (await client.get("/v1/kv/k")).status == 404
