"""--token: writes to the HTTP API need it (Consul's headers), reads do not; an API
off loopback without one is refused at start."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from consulate.control import discover_api
from consulate.control.api_context import ApiContext
from consulate.control.config import AgentConfig, ConfigError
from consulate.control.http_api import build_app
from consulate.control.registrator.adapters.consul_http import TOKEN_VARIABLE, ConsulHttp
from consulate.control.registry import EmbeddedRegistry
from consulate.control.registry.hub import WatchHub

TOKEN = "s3cret-token"
WEB = {"Name": "web", "ID": "web-1", "Address": "10.0.0.1", "Port": 80}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    registry.start()
    hub = WatchHub(registry)
    await hub.start()
    app = build_app(ApiContext(registry, node="n1", node_address="192.0.2.1",
                               datacenter="dc1", leader="192.0.2.1:8500", self_info=dict,
                               token=TOKEN))
    discover_api.add_routes(app, registry, hub, "n1")
    async with TestClient(TestServer(app)) as running:
        yield running
    await hub.close()
    await registry.close()


@pytest.mark.parametrize(("method", "path", "body"), [
    ("PUT", "/v1/agent/service/register", WEB),
    ("PUT", "/v1/kv/config", "x"),
    ("PUT", "/v1/discover/services/web/instances/a", {"addr": "10.0.0.1:80"}),
    ("DELETE", "/v1/kv/config", None),
])
async def test_writes_without_the_right_token_are_403(
    client: TestClient, method: str, path: str, body: object,  # type: ignore[type-arg]
) -> None:
    for headers in ({}, {"X-Consul-Token": "wrong"}, {"Authorization": "Bearer wrong"}):
        response = await client.request(method, path, json=body, headers=headers)
        assert response.status == 403
        assert "needs the agent's token" in await response.text()
    assert (await (await client.get("/v1/catalog/services")).json()) == {}  # nothing stored


async def test_the_token_in_either_header_lets_writes_in_and_reads_need_none(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    response = await client.put("/v1/agent/service/register", json=WEB,
                                headers={"X-Consul-Token": TOKEN})
    assert response.status == 200
    response = await client.put("/v1/kv/config", data=b"v",
                                headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200
    assert list(await (await client.get("/v1/catalog/services")).json()) == ["web"]


async def test_registrator_clients_send_consul_http_token(
    client: TestClient, monkeypatch: pytest.MonkeyPatch,  # type: ignore[type-arg]
) -> None:
    url = client.make_url("")
    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN)
    http = ConsulHttp("consulate", url.host or "127.0.0.1", url.port or 80)
    try:
        await http.call("PUT", "/v1/agent/service/register", body=WEB)
    finally:
        await http.close()
    assert list(await (await client.get("/v1/catalog/services")).json()) == ["web"]


def test_an_api_off_loopback_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--http-addr 0\.0\.0\.0:8500 listens beyond this "
                                          r"host: set --token"):
        AgentConfig(data_dir=tmp_path, http_addr=("0.0.0.0", 8500)).validate()
    AgentConfig(data_dir=tmp_path, http_addr=("0.0.0.0", 8500), token=TOKEN).validate()
    AgentConfig(data_dir=tmp_path, http_addr=("127.0.0.2", 8500)).validate()
