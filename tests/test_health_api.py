"""Health checks (control/health/, control/health_api.py): TTL, HTTP, TCP and script
checks run by the agent against real sockets and processes, and Consul's health
endpoints over a real HTTP server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from apiclient import DATACENTER, NODE, NODE_ADDRESS, Api, make_context

from consulate.control.agent import apply_change
from consulate.control.health.runner import HealthRunner
from consulate.control.http_api import build_app
from consulate.control.registry import Change, EmbeddedRegistry, Instance
from consulate.control.registry.model import HealthCheck
from consulate.proxy.table import Endpoint, RouteTable
from consulate.proxy.vip import VipAllocator

DEADLINE = 10.0  # the longest a check result may take to show (1 s probes, busy CI)


async def until(api: Api, path: str, done: Callable[[Any], bool]) -> Any:
    """GET ``path`` until ``done(body)``; fails after DEADLINE."""
    give_up = time.monotonic() + DEADLINE
    while True:
        body, _ = await api.get_json(path)
        if done(body):
            return body
        assert time.monotonic() < give_up, f"{path} stayed {body!r}"
        await asyncio.sleep(0.05)


def statuses(body: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(c["CheckID"], c["Status"]) for c in body]


async def register(api: Api, body: dict[str, Any]) -> None:
    assert await api.put("/v1/agent/service/register", body) == (200, "")


# -- TTL checks ----------------------------------------------------------------------


async def test_ttl_check_is_critical_until_passed_then_expires(api: Api) -> None:
    await register(api, {"ID": "db-1", "Name": "db", "Port": 5432, "Check": {"TTL": "1s"}})
    assert await api.get_json("/v1/health/service/db?passing") == ([], 2)
    assert await api.put("/v1/agent/check/pass/service:db-1?note=ready") == (200, "")
    body, index = await api.get_json("/v1/health/service/db?passing")
    assert ([e["Service"]["ID"] for e in body], index) == (["db-1"], 3)
    assert body[0]["Checks"][0]["Output"] == "ready"
    # No update within the TTL: critical, and the instance stays registered.
    body, index = await api.get_json("/v1/health/checks/db?index=3&wait=5s")
    assert (statuses(body), index) == ([("service:db-1", "critical")], 4)
    assert body[0]["Output"] == "TTL expired (no update in 1s)"
    assert [i.id for i in (await api.registry.instances())[0]] == ["db-1"]


async def test_warn_fail_and_update_set_the_ttl_result(api: Api) -> None:
    await register(api, {"ID": "db-1", "Name": "db", "Port": 5432, "Check": {"TTL": "30s"}})
    for verb, status in (("warn", "warning"), ("fail", "critical"), ("pass", "passing")):
        assert await api.put(f"/v1/agent/check/{verb}/service:db-1?note={verb}s") == (200, "")
        body, _ = await api.get_json("/v1/health/checks/db")
        assert (body[0]["Status"], body[0]["Output"]) == (status, f"{verb}s")
    assert await api.put("/v1/agent/check/update/service:db-1",
                         {"Status": "warning", "Output": "disk 91%"}) == (200, "")
    body, _ = await api.get_json("/v1/health/checks/db")
    assert (body[0]["Status"], body[0]["Output"]) == ("warning", "disk 91%")


async def test_a_pass_that_changes_nothing_writes_nothing(api: Api) -> None:
    await register(api, {"ID": "db-1", "Name": "db", "Port": 5432, "Check": {"TTL": "30s"}})
    await api.put("/v1/agent/check/pass/service:db-1")
    index = api.registry.index
    for _ in range(3):
        assert await api.put("/v1/agent/check/pass/service:db-1") == (200, "")
    assert api.registry.index == index  # no write, no watcher woken


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/v1/agent/check/pass/service:ghost", None, 404,
     f"Unknown check ID 'service:ghost': this agent (node '{NODE}') runs no check of that "
     "ID; list them with GET /v1/agent/checks"),
    ("/v1/agent/check/pass/tcp-1", None, 404,
     "CheckID 'tcp-1' does not have associated TTL: only TTL checks take updates, this one "
     "is TCP"),
    ("/v1/agent/check/update/service:db-1", {"Status": "fine"}, 400,
     "Invalid check status: 'fine': use passing, warning or critical"),
    ("/v1/agent/check/update/service:db-1", ["passing"], 400,
     'Request body must be a JSON object like {"Status": "passing", "Output": "ok"}'),
    ("/v1/agent/check/update/service:db-1", {"Status": "passing", "Output": 3}, 400,
     "Output must be a string, got 3"),
])
async def test_bad_check_updates_are_refused(api: Api, path: str, body: object, status: int,
                                             message: str) -> None:
    await register(api, {"ID": "db-1", "Name": "db", "Port": 5432, "Checks": [
        {"TTL": "30s", "Status": "passing", "CheckID": "service:db-1"},
        {"TCP": "127.0.0.1:1", "Interval": "30s", "CheckID": "tcp-1"}]})
    await until(api, "/v1/health/checks/db", lambda b: b[1]["Output"] != "")  # first probe
    before = await api.registry.instances()
    assert await api.put(path, body) == (status, message)
    assert await api.registry.instances() == before


# -- checks the agent probes -----------------------------------------------------------


@pytest.fixture
async def health_target() -> AsyncIterator[dict[str, Any]]:
    """A real HTTP server on 127.0.0.1 whose /health answers with ``state["code"]``."""
    state: dict[str, Any] = {"code": 200}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=state["code"], text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}/health"
    yield state
    await runner.cleanup()


async def test_http_check_follows_the_status_code(api: Api,
                                                  health_target: dict[str, Any]) -> None:
    url = health_target["url"]
    await register(api, {"ID": "web-1", "Name": "web", "Port": 80,
                         "Check": {"HTTP": url, "Interval": "1s", "Timeout": "2s"}})
    body = await until(api, "/v1/health/checks/web", lambda b: b[0]["Status"] == "passing")
    assert body[0]["Output"] == f"HTTP GET {url}: 200 OK Output: ok"
    health_target["code"] = 429
    body = await until(api, "/v1/health/checks/web", lambda b: b[0]["Status"] == "warning")
    assert body[0]["Output"] == f"HTTP GET {url}: 429 Too Many Requests Output: ok"
    health_target["code"] = 503
    body = await until(api, "/v1/health/checks/web", lambda b: b[0]["Status"] == "critical")
    assert body[0]["Output"] == f"HTTP GET {url}: 503 Service Unavailable Output: ok"


async def test_tcp_check_and_deregistration_after_critical(api: Api) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    await register(api, {"ID": "db-1", "Name": "db", "Port": port, "Check": {
        "TCP": f"127.0.0.1:{port}", "Interval": "1s", "DeregisterCriticalServiceAfter": "1s"}})
    body = await until(api, "/v1/health/checks/db", lambda b: b[0]["Status"] == "passing")
    assert body[0]["Output"] == f"TCP connect 127.0.0.1:{port}: Success"
    listener.close()
    body = await until(api, "/v1/health/checks/db",
                       lambda b: not b or b[0]["Status"] == "critical")
    if body:  # seen between going critical and the deregistration
        assert body[0]["Output"] == f"TCP connect 127.0.0.1:{port}: Connection refused"
    await until(api, "/v1/catalog/service/db", lambda b: b == [])


async def test_re_registration_keeps_the_check_results(
        api: Api, health_target: dict[str, Any]) -> None:
    registration = {"ID": "web-1", "Name": "web", "Port": 80,
                    "Check": {"HTTP": health_target["url"], "Interval": "30s"}}
    await register(api, registration)
    await until(api, "/v1/health/checks/web", lambda b: b[0]["Status"] == "passing")
    index = api.registry.index
    await register(api, registration)  # registrator's resync sends the same body again
    assert api.registry.index == index
    assert (await api.registry.get("web-1")).status == "passing"  # type: ignore[union-attr]


async def test_script_checks_run_when_enabled(tmp_path: Path) -> None:
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    registry.start()
    context = make_context(registry)
    context.health = HealthRunner(registry, NODE, scripts_enabled=True)
    async with TestClient(TestServer(build_app(context))) as client:
        api = Api(client, registry)
        await register(api, {"ID": "job-1", "Name": "job", "Port": 80, "Check": {
            "Args": ["sh", "-c", "echo queue is long; exit 1"], "Interval": "1s"}})
        body = await until(api, "/v1/health/checks/job", lambda b: b[0]["Status"] != "critical")
        assert (body[0]["Status"], body[0]["Output"]) == ("warning", "queue is long\n")
    await registry.close()


# -- reads -------------------------------------------------------------------------------


async def seed(api: Api) -> None:
    """web-1 passing (tags v1, blue), web-2 warning, web-3 critical, db-1 of node-b."""
    for number, tags, verb in ((1, ["v1", "blue"], "pass"), (2, ["v1"], "warn"),
                               (3, ["v2"], "fail")):
        await register(api, {"ID": f"web-{number}", "Name": "web", "Address": f"10.0.0.{number}",
                             "Port": 80, "Tags": tags, "Meta": {"n": str(number)},
                             "Check": {"TTL": "60s"}})
        await api.put(f"/v1/agent/check/{verb}/service:web-{number}?note={verb}")
    await api.registry.register(Instance(
        id="db-1", name="db", address="10.0.9.9", port=5432, node="node-b",
        checks=(HealthCheck(id="service:db-1", kind="ttl", ttl=60.0, status="passing"),)))


async def test_health_service_entry_is_consuls_shape(api: Api) -> None:
    await seed(api)
    body, index = await api.get_json("/v1/health/service/web?passing")
    assert index == api.registry.index
    assert body == [{
        "Node": {"ID": "", "Node": NODE, "Address": NODE_ADDRESS, "Datacenter": DATACENTER,
                 "TaggedAddresses": {"lan": NODE_ADDRESS, "wan": NODE_ADDRESS}, "Meta": {},
                 "CreateIndex": 0, "ModifyIndex": 0},
        "Service": {"ID": "web-1", "Service": "web", "Tags": ["v1", "blue"], "Meta": {"n": "1"},
                    "Port": 80, "Address": "10.0.0.1", "Weights": {"Passing": 1, "Warning": 1},
                    "EnableTagOverride": False, "CreateIndex": 2, "ModifyIndex": 3},
        "Checks": [{
            "Node": NODE, "CheckID": "service:web-1", "Name": "Service 'web' check",
            "Status": "passing", "Notes": "", "Output": "pass", "ServiceID": "web-1",
            "ServiceName": "web", "ServiceTags": ["v1", "blue"], "Type": "ttl",
            "Interval": "", "Timeout": "",
            "Definition": {"HTTP": "", "TCP": "", "ScriptArgs": None, "Method": "",
                           "Header": None, "TLSSkipVerify": False, "Interval": "",
                           "Timeout": "", "TTL": "1m0s", "DeregisterCriticalServiceAfter": ""},
            "CreateIndex": 2, "ModifyIndex": 3}],
    }]


@pytest.mark.parametrize(("query", "ids"), [
    ("", ["web-1", "web-2", "web-3"]),
    ("?passing", ["web-1"]),
    ("?passing=false", ["web-1", "web-2", "web-3"]),
    ("?tag=v1", ["web-1", "web-2"]),
    ("?tag=v1&tag=blue", ["web-1"]),
    ("?filter=Service.Meta.n%20!%3D%20%222%22", ["web-1", "web-3"]),
    ("?filter=Checks.Status%20%3D%3D%20critical%20or%20%22blue%22%20in%20Service.Tags",
     ["web-1", "web-3"]),
    ("?tag=v1&filter=not%20Service.Tags%20contains%20blue", ["web-2"]),
])
async def test_health_service_passing_tag_and_filter(api: Api, query: str,
                                                     ids: list[str]) -> None:
    await seed(api)
    body, _ = await api.get_json(f"/v1/health/service/web{query}")
    assert [e["Service"]["ID"] for e in body] == ids


async def test_health_state_and_agent_checks(api: Api) -> None:
    await seed(api)
    body, _ = await api.get_json("/v1/health/state/critical")
    assert statuses(body) == [("service:web-3", "critical")]
    body, _ = await api.get_json("/v1/health/state/any")
    assert [c["CheckID"] for c in body] == ["service:db-1", "service:web-1", "service:web-2",
                                            "service:web-3"]
    checks, _ = await api.get_json("/v1/health/state/passing")
    assert statuses(checks) == [("service:db-1", "passing"), ("service:web-1", "passing")]
    async with api.client.get("/v1/agent/checks") as response:
        mine = await response.json()
    assert sorted(mine) == ["service:web-1", "service:web-2", "service:web-3"]  # not node-b's
    async with api.client.get("/v1/agent/checks?filter=Status%20%3D%3D%20warning") as response:
        assert sorted(await response.json()) == ["service:web-2"]


async def test_filter_on_catalog_and_agent_services(api: Api) -> None:
    await seed(api)
    body, _ = await api.get_json("/v1/catalog/service/web?filter=ServiceAddress%20matches%20"
                                 "%22%5C.[12]%24%22")
    assert [e["ServiceID"] for e in body] == ["web-1", "web-2"]
    async with api.client.get("/v1/agent/services?filter=Tags%20contains%20v2") as response:
        assert list(await response.json()) == ["web-3"]


@pytest.mark.parametrize(("path", "message"), [
    ("/v1/health/service/web?filter=Colour%20%3D%3D%20red",
     "Failed to create boolean expression evaluator: Selector 'Colour' is not valid: "
     "selectors start with one of Checks, Node, Service"),
    ("/v1/health/service/web?filter=Service.Tags%20%3D%3D",
     "Failed to create boolean expression evaluator: the expression ends where a value was "
     "expected"),
    ("/v1/catalog/service/web?filter=ServiceTags%20matches%20%22(%22",
     "Failed to create boolean expression evaluator: bad regular expression '(': missing ), "
     "unterminated subpattern at position 0"),
    ("/v1/health/state/sick", "Invalid state 'sick': use any, passing, warning or critical"),
])
async def test_bad_filters_and_states_are_400(api: Api, path: str, message: str) -> None:
    async with api.client.get(path) as response:
        assert (response.status, await response.text()) == (400, message)


# -- routing follows health --------------------------------------------------------------


def test_critical_instances_leave_the_routes_and_warning_ones_get_their_weight(
        tmp_path: Path) -> None:
    table = RouteTable(VipAllocator("240.0.0.0/24", tmp_path / "vips.json"))
    ttl = HealthCheck(id="c", kind="ttl", ttl=10.0, status="passing")
    web = Instance(id="web-1", name="web", address="10.0.0.1", port=80, weight=10,
                   warning_weight=2, checks=(ttl,))
    apply_change(table, Change(1, "snapshot", (web,)))
    endpoint = Endpoint("web", "web-1", "10.0.0.1", 80, weight=10)
    assert table.service("web").endpoints == (endpoint,)  # type: ignore[union-attr]
    apply_change(table, Change(2, "up", (web.with_check_result("c", "warning", ""),)))
    assert table.service("web").endpoints == (  # type: ignore[union-attr]
        Endpoint("web", "web-1", "10.0.0.1", 80, weight=2),)
    apply_change(table, Change(3, "up", (web.with_check_result("c", "critical", ""),)))
    assert table.service("web").endpoints == ()  # type: ignore[union-attr]
    apply_change(table, Change(4, "snapshot", (web.with_check_result("c", "critical", ""),)))
    assert table.service("web").endpoints == ()  # type: ignore[union-attr]
    apply_change(table, Change(5, "up", (web,)))
    assert table.service("web").endpoints == (endpoint,)  # type: ignore[union-attr]
