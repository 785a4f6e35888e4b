"""The HTTP API with a registry backend that cannot be reached: 503 with the reason."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from consulate.control.api_context import ApiContext
from consulate.control.http_api import build_app
from consulate.control.registry.etcd import EtcdRegistry

UNREACHABLE = ("127.42.0.4", 2379)  # nothing listens there


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    registry = EtcdRegistry([UNREACHABLE])
    context = ApiContext(registry, node="n1", node_address="192.0.2.1", datacenter="dc1",
                         leader="192.0.2.1:8500", self_info=dict)
    async with TestClient(TestServer(build_app(context))) as running:
        yield running
    await registry.close()


@pytest.mark.parametrize(("method", "path", "body"), [
    ("PUT", "/v1/agent/service/register",
     {"Name": "web", "ID": "web-1", "Address": "10.0.0.1", "Port": 80}),
    ("GET", "/v1/catalog/services", None),
    ("GET", "/v1/catalog/service/web", None),
])
async def test_a_registry_that_is_down_gives_503_with_the_reason(
    client: TestClient, method: str, path: str, body: object  # type: ignore[type-arg]
) -> None:
    response = await client.request(method, path, json=body)
    assert response.status == 503
    text = await response.text()
    assert text.startswith("etcd at 127.42.0.4:2379 is not answering"), text
    assert "--registry embedded" in text
    # The server is still there for the next request.
    assert (await client.get("/v1/status/leader")).status == 200
