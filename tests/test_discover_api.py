"""Discoverd's HTTP API on the agent's server, over the embedded registry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from consulate.control import discover_api
from consulate.control.registry import EmbeddedRegistry
from consulate.control.registry.hub import WatchHub

BASE = "/v1/discover/services"


@dataclass
class Api:
    client: TestClient  # type: ignore[type-arg]
    registry: EmbeddedRegistry


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    registry.start()
    hub = WatchHub(registry)
    await hub.start()
    app = web.Application()
    discover_api.add_routes(app, registry, hub, node="node-a")
    async with TestClient(TestServer(app)) as client:
        yield Api(client, registry)
    await hub.close()
    await registry.close()


async def put(api: Api, name: str, instance_id: str, body: Any) -> tuple[int, Any]:
    response = await api.client.put(f"{BASE}/{name}/instances/{instance_id}",
                                    data=json.dumps(body))
    text = await response.text()
    return response.status, json.loads(text) if response.status == 200 else text


async def test_register_then_list_oldest_first(api: Api) -> None:
    status, first = await put(api, "web", "b", {"addr": "10.0.0.2:80", "meta": {"v": "1"}})
    assert status == 200
    assert first == {"id": "b", "service": "web", "addr": "10.0.0.2:80", "proto": "tcp",
                     "tags": [], "meta": {"v": "1"}, "index": first["index"]}
    await put(api, "web", "a", {"addr": "10.0.0.1:80", "proto": "udp"})
    response = await api.client.get(f"{BASE}/web/instances")
    listed = await response.json()
    assert [i["id"] for i in listed] == ["b", "a"]  # registration order, not ids
    assert listed[1]["proto"] == "udp" and listed[1]["tags"] == ["udp"]
    assert int(response.headers["X-Discoverd-Index"]) >= listed[1]["index"]
    stored = await api.registry.get("b")
    assert stored is not None and stored.ttl == discover_api.DEFAULT_TTL


async def test_a_heartbeat_keeps_the_registration_age_and_wakes_no_watcher(api: Api) -> None:
    _, first = await put(api, "web", "a", {"addr": "10.0.0.1:80"})
    index = (await api.client.get(f"{BASE}/web/instances")).headers["X-Discoverd-Index"]
    poll = asyncio.ensure_future(api.client.get(f"{BASE}/web/instances",
                                                params={"index": index, "wait": "1s"}))
    await asyncio.sleep(0.1)
    _, again = await put(api, "web", "a", {"addr": "10.0.0.1:80"})
    assert again == first
    response = await poll
    assert response.headers["X-Discoverd-Index"] == index  # returned at the timeout


async def test_long_poll_returns_on_a_change(api: Api) -> None:
    await put(api, "web", "a", {"addr": "10.0.0.1:80"})
    index = (await api.client.get(f"{BASE}/web/instances")).headers["X-Discoverd-Index"]
    poll = asyncio.ensure_future(api.client.get(f"{BASE}/web/instances",
                                                params={"index": index, "wait": "30s"}))
    await asyncio.sleep(0.1)
    await put(api, "web", "b", {"addr": "10.0.0.2:80"})
    response = await asyncio.wait_for(poll, 5)
    assert [i["id"] for i in await response.json()] == ["a", "b"]
    assert int(response.headers["X-Discoverd-Index"]) > int(index)


async def test_event_stream_and_leader(api: Api) -> None:
    await put(api, "web", "a", {"addr": "10.0.0.1:80"})
    response = await api.client.get(f"{BASE}/web/instances",
                                    headers={"Accept": "text/event-stream"})
    assert response.headers["Content-Type"] == "text/event-stream"

    async def next_event() -> tuple[str, Any]:
        lines: dict[str, str] = {}
        while (line := (await response.content.readline()).decode().rstrip("\n")) != "":
            key, _, value = line.partition(": ")
            lines[key] = value
        data = json.loads(lines["data"])
        return lines["event"], data["id"] if data else None

    assert [await next_event() for _ in range(3)] == [("up", "a"), ("current", None),
                                                      ("leader", "a")]
    await put(api, "web", "b", {"addr": "10.0.0.2:80"})
    assert await asyncio.wait_for(next_event(), 5) == ("up", "b")
    assert (await api.client.delete(f"{BASE}/web/instances/a")).status == 200
    assert [await asyncio.wait_for(next_event(), 5) for _ in range(2)] == [
        ("down", "a"), ("leader", "b")]
    response.close()
    leader = await (await api.client.get(f"{BASE}/web/leader")).json()
    assert leader["id"] == "b"


async def test_no_leader_is_404(api: Api) -> None:
    response = await api.client.get(f"{BASE}/nothing/leader")
    assert response.status == 404
    assert "has no live instance" in await response.text()


@pytest.mark.parametrize(("name", "instance_id", "body", "message"), [
    ("web app", "a", {"addr": "10.0.0.1:80"}, "cannot be used in DNS"),
    ("web", "a", {"addr": "10.0.0.1:0"}, "port from 1 to 65535"),
    ("web", "a", {"addr": "10.0.0.1:70000"}, "port from 1 to 65535"),
    ("web", "a", {"addr": "web.local:80"}, "is not an IPv4 address"),
    ("web", "a", {"addr": "10.0.0.1:80", "ttl": "0s"}, "must be above zero"),
    ("web", "a", {"addr": "10.0.0.1:80", "proto": "sctp"}, "must be tcp or udp"),
    ("web", "a", {"addr": "10.0.0.1:80", "port": 80}, "unknown field(s) port"),
    ("web", "a", ["10.0.0.1:80"], "must be a JSON object"),
    ("web", "a" * 129, {"addr": "10.0.0.1:80"}, "use 1 to 128 characters"),
])
async def test_bad_registrations_are_400_and_store_nothing(
    api: Api, name: str, instance_id: str, body: Any, message: str
) -> None:
    status, text = await put(api, name, instance_id, body)
    assert status == 400
    assert message in text
    assert (await api.registry.instances())[0] == []


async def test_invalid_json_and_unknown_instance(api: Api) -> None:
    response = await api.client.put(f"{BASE}/web/instances/a", data=b"{nope")
    assert response.status == 400
    assert "invalid JSON body" in await response.text()
    response = await api.client.delete(f"{BASE}/web/instances/ghost")
    assert response.status == 404
    assert "has no instance 'ghost'" in await response.text()


async def test_an_id_of_another_service_is_a_conflict(api: Api) -> None:
    await put(api, "alpha", "i1", {"addr": "10.0.0.1:80"})
    status, text = await put(api, "beta", "i1", {"addr": "10.0.0.2:80"})
    assert status == 409
    assert "belongs to service 'alpha'" in text
    held = await api.registry.get("i1")
    assert held is not None and (held.name, held.address) == ("alpha", "10.0.0.1")


# -- found by make fuzz -----------------------------------------------------------------


async def test_a_deep_body_and_a_port_of_other_digits_are_400(api: Api) -> None:
    response = await api.client.put(f"{BASE}/web/instances/a",
                                    data=b"[" * 100_000 + b"]" * 100_000)
    assert (response.status, await response.text()) == (
        400, "invalid JSON body: nested too deeply")
    assert await put(api, "web", "a", {"addr": "10.0.0.5:⁰"}) == (
        400, "addr '10.0.0.5:⁰' must be IP:PORT with a port from 1 to 65535")
    assert (await api.registry.instances())[0] == []
