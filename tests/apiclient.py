"""The agent's HTTP API on a real socket (aiohttp's test server) over an embedded
registry, with the small client the API tests share."""

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

from consulate.control.api_context import ApiContext
from consulate.control.http_api import build_app
from consulate.control.registry import EmbeddedRegistry

NODE = "node-a"
NODE_ADDRESS = "192.0.2.10"
DATACENTER = "dc1"
LEADER = "192.0.2.10:8500"
SELF_INFO = {"Config": {"NodeName": NODE, "Datacenter": DATACENTER}, "Member": {"Status": 1}}
STEP = 1.0  # the longest any single awaited event may take

@dataclass
class Api:
    client: TestClient[web.Request, web.Application]
    registry: EmbeddedRegistry

    async def put(self, path: str, body: object = None, *, raw: bytes | None = None
                  ) -> tuple[int, str]:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        async with self.client.put(path, data=data) as response:
            return response.status, await response.text()

    async def get_json(self, path: str) -> tuple[Any, int]:
        """The decoded body and X-Consul-Index of a 200 response."""
        async with self.client.get(path) as response:
            assert response.status == 200, await response.text()
            assert response.content_type == "application/json"
            return await response.json(), int(response.headers["X-Consul-Index"])


def make_context(registry: EmbeddedRegistry) -> ApiContext:
    return ApiContext(registry, node=NODE, node_address=NODE_ADDRESS, datacenter=DATACENTER,
                      leader=LEADER, self_info=lambda: SELF_INFO)


async def close_registry(registry: EmbeddedRegistry) -> None:
    await asyncio.wait_for(registry.close(), STEP)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[EmbeddedRegistry]:
    """A started embedded registry in the test's directory (the default backend)."""
    running = EmbeddedRegistry(tmp_path / "registry.db")
    running.start()
    yield running
    await close_registry(running)


@pytest.fixture
async def api(registry: EmbeddedRegistry) -> AsyncIterator[Api]:
    async with TestClient(TestServer(build_app(make_context(registry)))) as client:
        yield Api(client, registry)
