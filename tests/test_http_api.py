"""The agent's Consul-compatible HTTP API (control/http_api.py), over real sockets."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import consul
import pytest
from aiohttp import web
from apiclient import (
    DATACENTER,
    LEADER,
    NODE,
    NODE_ADDRESS,
    SELF_INFO,
    STEP,
    Api,
    close_registry,
    make_context,
)

from consulate.control.http_api import build_app
from consulate.control.registry import EmbeddedRegistry, Instance

WEB_1 = {"ID": "web-1", "Name": "web", "Address": "10.0.0.5", "Port": 80, "Tags": ["v1", "blue"]}


def entry(instance_id: str, address: str, port: int, tags: list[str], index: int,
          modify_index: int | None = None, meta: dict[str, str] | None = None
          ) -> dict[str, Any]:
    return {
        "ID": "", "Node": NODE, "Address": NODE_ADDRESS, "Datacenter": DATACENTER,
        "TaggedAddresses": {"lan": NODE_ADDRESS, "wan": NODE_ADDRESS}, "NodeMeta": {},
        "ServiceKind": "", "ServiceID": instance_id, "ServiceName": "web",
        "ServiceTags": tags, "ServiceAddress": address,
        "ServiceWeights": {"Passing": 1, "Warning": 1}, "ServiceMeta": meta or {},
        "ServicePort": port, "ServiceEnableTagOverride": False,
        "CreateIndex": index, "ModifyIndex": index if modify_index is None else modify_index,
    }


# -- register, read, deregister -----------------------------------------------------


async def test_register_then_list_services(api: Api) -> None:
    assert await api.put("/v1/agent/service/register", WEB_1) == (200, "")
    async with api.client.get("/v1/catalog/services") as response:
        assert response.status == 200
        assert response.headers["X-Consul-Index"] == str(api.registry.index) == "2"
        assert response.headers["X-Consul-KnownLeader"] == "true"
        assert await response.json() == {"web": ["blue", "v1"]}


async def test_services_merge_tags_per_service(api: Api) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    await api.put("/v1/agent/service/register",
                  {"ID": "web-2", "Name": "web", "Address": "10.0.0.6", "Port": 80,
                   "Tags": ["v2", "blue"]})
    await api.put("/v1/agent/service/register", {"Name": "db", "Port": 5432})
    assert await api.get_json("/v1/catalog/services") == (
        {"db": [], "web": ["blue", "v1", "v2"]}, 4
    )


async def test_catalog_service_has_consuls_fields(api: Api) -> None:
    await api.put("/v1/agent/service/register", {**WEB_1, "Meta": {"version": "2"}})
    await api.put("/v1/agent/service/register", {"Name": "web", "ID": "web-0", "Port": 8080})
    body, index = await api.get_json("/v1/catalog/service/web")
    assert index == 3
    assert body == [
        entry("web-0", NODE_ADDRESS, 8080, [], 3),  # Address defaults to the agent's
        entry("web-1", "10.0.0.5", 80, ["v1", "blue"], 2, meta={"version": "2"}),
    ]


async def test_catalog_shows_registered_weights_as_consul_does(api: Api) -> None:
    await api.put("/v1/agent/service/register",
                  {**WEB_1, "Weights": {"Passing": 10, "Warning": 3}})
    [found], _ = await api.get_json("/v1/catalog/service/web")
    assert found["ServiceWeights"] == {"Passing": 10, "Warning": 3}
    status, text = await api.put("/v1/agent/service/register",
                                 {**WEB_1, "Weights": {"Passing": 0}})
    assert (status, text) == (400, "Weights.Passing 0 is invalid: give a whole number "
                                   "from 1 to 65535")


async def test_reregistration_shows_in_modify_index(api: Api) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    await api.put("/v1/agent/service/register", WEB_1)  # identical: no new index
    assert api.registry.index == 2
    await api.put("/v1/agent/service/register", {**WEB_1, "Port": 81})
    body, index = await api.get_json("/v1/catalog/service/web")
    assert index == 3
    assert body == [entry("web-1", "10.0.0.5", 81, ["v1", "blue"], 2, modify_index=3)]


async def test_catalog_service_tag_filter(api: Api) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    await api.put("/v1/agent/service/register",
                  {"ID": "web-2", "Name": "web", "Address": "10.0.0.6", "Port": 80,
                   "Tags": ["v2", "blue"]})

    async def ids(query: str) -> list[str]:
        body, _ = await api.get_json(f"/v1/catalog/service/web{query}")
        return [e["ServiceID"] for e in body]

    assert await ids("") == ["web-1", "web-2"]
    assert await ids("?tag=v1") == ["web-1"]
    assert await ids("?tag=v2") == ["web-2"]
    assert await ids("?tag=blue") == ["web-1", "web-2"]
    assert await ids("?tag=blue&tag=v2") == ["web-2"]
    assert await ids("?tag=green") == []


async def test_unknown_service_is_an_empty_list(api: Api) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    assert await api.get_json("/v1/catalog/service/nothing") == ([], 2)


async def test_deregister(api: Api) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    await api.put("/v1/agent/service/register", {"Name": "db", "Port": 5432})
    assert await api.put("/v1/agent/service/deregister/web-1") == (200, "")
    assert await api.registry.get("web-1") is None
    assert await api.get_json("/v1/catalog/services") == ({"db": []}, 4)
    assert await api.get_json("/v1/catalog/service/web") == ([], 4)


# -- rejections -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"Port": 80}', 'Missing service name: set "Name" to the service\'s name'),
        (b'{"Name": "web", "Port": 0}', "Port 0 is invalid: give a number from 1 to 65535"),
        (b'{"Name": "web", "Port": 70000}',
         "Port 70000 is invalid: give a number from 1 to 65535"),
        (b'{"Name": "web", "Port": "80"}',
         "Port '80' is invalid: give a number from 1 to 65535"),
        (b'{"Name": "web", "Port": 80, "Colour": "red"}',
         "Request decode failed: unknown field(s) Colour; "
         "known fields are ID, Name, Tags, Address, Port, Meta, Weights, Check, Checks"),
        (b"", 'Request body must be a JSON object like {"Name": "web", "Port": 80}, '
              "got NoneType"),
        (b"[]", 'Request body must be a JSON object like {"Name": "web", "Port": 80}, '
                "got list"),
        (b'{"Name": "web.api", "Port": 80}',
         "Name 'web.api' cannot be used in DNS: use 1 to 63 letters, digits, '-' or '_', "
         "starting and ending with a letter or digit"),
        (b'{"Name": "web", "Port": 80, "Check": {"TTL": "0s"}}',
         "check TTL '0s' must be a duration longer than zero, like '10s'"),
        (b'{"Name": "web", "Port": 80, "Check": {"HTTP": "http://h/", "TCP": "h:1", '
         b'"Interval": "1s"}}',
         "a check needs exactly one of TTL, HTTP, TCP or Args, got HTTP, TCP"),
        (b'{"Name": "web", "Port": 80, "Check": {"HTTP": "http://h/"}}',
         'check Interval is required for HTTP checks, like "10s"'),
        (b'{"Name": "web", "Port": 80, "Check": {"HTTP": "ftp://h/", "Interval": "1s"}}',
         "check HTTP 'ftp://h/' must be an http:// or https:// URL"),
        (b'{"Name": "web", "Port": 80, "Check": {"TCP": "h:0", "Interval": "1s"}}',
         "check TCP 'h:0' must be host:port"),
        (b'{"Name": "web", "Port": 80, "Check": {"TTL": "5s", "Status": "fine"}}',
         "check Status 'fine' is invalid: use passing, warning or critical"),
        (b'{"Name": "web", "Port": 80, "Check": {"GRPC": "h:1", "Interval": "1s"}}',
         "check has unknown field(s) GRPC: this agent runs TTL, HTTP, TCP and Args "
         "(script) checks"),
        (b'{"Name": "web", "Port": 80, "Checks": [{"TTL": "5s", "CheckID": "a"}, '
         b'{"TTL": "5s", "CheckID": "a"}]}',
         "Checks have duplicate CheckIDs ['a', 'a']: give each its own"),
        (b'{"Name": "web", "Port": 80, "Check": {"Args": ["true"], "Interval": "1s"}}',
         "Scripts are disabled on this agent; to enable them, start it with "
         "--enable-script-checks"),
    ],
    ids=["no-name", "port-0", "port-70000", "port-string", "unknown-field", "empty-body",
         "array-body", "dotted-name", "zero-ttl", "two-kinds", "no-interval", "ftp-url",
         "tcp-port-0", "bad-status", "unknown-check-field", "duplicate-check-ids",
         "scripts-disabled"],
)
async def test_bad_registration_is_400_and_stores_nothing(
    api: Api, raw: bytes, message: str
) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    before = await api.registry.instances()
    async with api.client.put("/v1/agent/service/register", data=raw) as response:
        assert response.status == 400
        assert response.content_type == "text/plain"
        assert await response.text() == message
    assert await api.registry.instances() == before


@pytest.mark.parametrize("raw", [b'{"Name": "web",', b"not json", b"\xff\xfe\xfa"])
async def test_invalid_json_is_400_and_stores_nothing(api: Api, raw: bytes) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    before = await api.registry.instances()
    status, text = await api.put("/v1/agent/service/register", raw=raw)
    assert status == 400
    assert text.startswith("Request decode failed: invalid JSON body: ")
    assert "invalid JSON" in text
    assert await api.registry.instances() == before


async def test_deregister_unknown_id_is_404_naming_it(api: Api) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    before = await api.registry.instances()
    status, text = await api.put("/v1/agent/service/deregister/ghost-7")
    assert status == 404
    assert text == ("Unknown service ID 'ghost-7': list registered ids with "
                    "GET /v1/catalog/service/<name> or `consulate services`")
    assert await api.registry.instances() == before


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/agent/service/register"), ("GET", "/v1/agent/service/deregister/web-1"),
     ("GET", "/v1/agent/check/pass/service:web-1"), ("POST", "/v1/agent/service/register"),
     ("PUT", "/v1/catalog/services"), ("DELETE", "/v1/catalog/service/web")],
)
async def test_wrong_method_is_405(api: Api, method: str, path: str) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    before = await api.registry.instances()
    async with api.client.request(method, path) as response:
        assert response.status == 405
    assert await api.registry.instances() == before


async def test_unknown_path_is_404(api: Api) -> None:
    async with api.client.get("/v1/catalog/nodes-that-do-not-exist") as response:
        assert response.status == 404


# -- blocking queries ---------------------------------------------------------------


async def test_blocking_services_query_returns_after_a_registration(api: Api) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    _, index = await api.get_json("/v1/catalog/services")
    started = time.monotonic()
    query = asyncio.ensure_future(api.get_json(f"/v1/catalog/services?index={index}&wait=5s"))
    await asyncio.sleep(0.1)
    assert not query.done()
    assert await api.put("/v1/agent/service/register", {"Name": "db", "Port": 5432}) == (200, "")
    body, new_index = await asyncio.wait_for(query, STEP)
    assert time.monotonic() - started < 1.0
    assert new_index == index + 1 == api.registry.index
    assert body == {"db": [], "web": ["blue", "v1"]}


async def test_a_blocking_query_on_an_empty_registry_wakes_on_the_first_write(
        api: Api) -> None:
    body, index = await api.get_json("/v1/catalog/services")
    assert (body, index) == ({}, 1)  # never 0, as Consul
    query = asyncio.ensure_future(api.get_json(f"/v1/catalog/services?index={index}&wait=5s"))
    await asyncio.sleep(0.1)
    assert not query.done()
    await api.put("/v1/agent/service/register", WEB_1)
    assert await asyncio.wait_for(query, STEP) == ({"web": ["blue", "v1"]}, 2)  # a new index


async def test_an_index_from_a_registry_that_was_reset_wakes_on_the_next_write(
        api: Api) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    query = asyncio.ensure_future(api.get_json("/v1/catalog/services?index=900&wait=5s"))
    await asyncio.sleep(0.1)
    assert not query.done()
    await api.put("/v1/agent/service/register", {"Name": "db", "Port": 5432})
    assert await asyncio.wait_for(query, STEP) == ({"db": [], "web": ["blue", "v1"]}, 3)


async def test_blocking_service_query_returns_after_a_deregistration(api: Api) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    query = asyncio.ensure_future(api.get_json("/v1/catalog/service/web?index=2&wait=5s"))
    await asyncio.sleep(0.1)
    assert not query.done()
    await api.put("/v1/agent/service/deregister/web-1")
    assert await asyncio.wait_for(query, STEP) == ([], 3)


async def test_blocking_query_with_an_old_index_returns_at_once(api: Api) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    await api.put("/v1/agent/service/register", {"Name": "db", "Port": 5432})
    started = time.monotonic()
    assert await api.get_json("/v1/catalog/services?index=2&wait=5s") == (
        {"db": [], "web": ["blue", "v1"]}, 3
    )
    assert time.monotonic() - started < 0.5


async def test_blocking_query_times_out_with_the_same_index(api: Api) -> None:
    await api.put("/v1/agent/service/register", WEB_1)
    started = time.monotonic()
    assert await api.get_json("/v1/catalog/services?index=2&wait=100ms") == (
        {"web": ["blue", "v1"]}, 2
    )
    assert 0.09 <= time.monotonic() - started < 0.6


@pytest.mark.parametrize(
    ("query", "message"),
    [("index=abc", "index 'abc' must be a non-negative integer"),
     ("index=-1", "index '-1' must be a non-negative integer"),
     ("index=", "index '' must be a non-negative integer"),
     ("index=1&wait=soon", "wait: duration 'soon' is not a string like '10s' or '1m30s'")],
)
async def test_bad_blocking_query_parameters_are_400(api: Api, query: str, message: str) -> None:
    for path in ("/v1/catalog/services", "/v1/catalog/service/web"):
        async with api.client.get(f"{path}?{query}") as response:
            assert response.status == 400
            assert await response.text() == message


# -- status and self ----------------------------------------------------------------


async def test_status_leader_is_a_json_string(api: Api) -> None:
    async with api.client.get("/v1/status/leader") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.text() == json.dumps(LEADER)


async def test_agent_self(api: Api) -> None:
    async with api.client.get("/v1/agent/self") as response:
        assert response.status == 200
        assert await response.json() == SELF_INFO


# -- py-consul ----------------------------------------------------------------------


def _py_consul_session(port: int) -> dict[str, Any]:
    with consul.Consul(host="127.0.0.1", port=port) as c:
        seen: dict[str, Any] = {}
        seen["register"] = c.agent.service.register(
            "web", service_id="web-1", address="10.0.0.5", port=80, tags=["v1"]
        )
        seen["register_ttl"] = c.agent.service.register(
            "db", service_id="db-1", address="10.0.0.9", port=5432,
            check=consul.Check.ttl("10s"),
        )
        seen["critical_before_pass"] = c.health.service("db", passing=True)
        seen["ttl_pass"] = c.agent.check.ttl_pass("service:db-1")
        seen["passing_after_pass"] = c.health.service("db", passing=True)[1][0]["Service"]["ID"]
        seen["ttl_warn"] = c.agent.check.ttl_warn("service:db-1", notes="slow disk")
        seen["passing_after_warn"] = c.health.service("db", passing=True)
        seen["checks"] = c.agent.checks()
        seen["ttl_pass_again"] = c.agent.check.ttl_pass("service:db-1")
        seen["services"] = c.catalog.services()
        seen["service"] = c.catalog.service("web")
        seen["service_tag"] = c.catalog.service("web", tag="v2")
        seen["leader"] = c.status.leader()
        seen["self"] = c.agent.self()
        seen["deregister"] = c.agent.service.deregister("web-1")
        seen["services_after"] = c.catalog.services()
        try:
            c.agent.service.register("bad", port=70000)
        except consul.ConsulException as exc:
            seen["bad_register"] = str(exc)
        return seen


async def test_py_consul_client_against_the_api(tmp_path: Path) -> None:
    """The py-consul client library, unmodified, against consulate's API.

    There is no Consul server on this machine, so py-consul is exercised against
    consulate's own Consul-compatible API: a real aiohttp AppRunner on 127.0.0.1
    (port chosen by the kernel), with the synchronous client in a worker thread.
    """
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    registry.start()
    runner = web.AppRunner(build_app(make_context(registry)), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        seen = await asyncio.wait_for(asyncio.to_thread(_py_consul_session, port), 10)
        stored = (await registry.instances())[0]
    finally:
        await runner.cleanup()
        await close_registry(registry)

    assert seen["register"] is True
    assert seen["register_ttl"] is True
    assert seen["critical_before_pass"] == ("3", [])  # a TTL check starts critical
    assert seen["ttl_pass"] is True
    assert seen["passing_after_pass"] == "db-1"
    assert seen["ttl_warn"] is True
    assert seen["passing_after_warn"] == ("5", [])
    assert seen["checks"] == {"service:db-1": {
        "Node": NODE, "CheckID": "service:db-1", "Name": "Service 'db' check",
        "Status": "warning", "Notes": "", "Output": "slow disk", "ServiceID": "db-1",
        "ServiceName": "db", "ServiceTags": [], "Type": "ttl", "Interval": "", "Timeout": "",
        "Definition": {"HTTP": "", "TCP": "", "ScriptArgs": None, "Method": "", "Header": None,
                       "TLSSkipVerify": False, "Interval": "", "Timeout": "", "TTL": "10s",
                       "DeregisterCriticalServiceAfter": ""},
        "CreateIndex": 3, "ModifyIndex": 5}}
    assert seen["ttl_pass_again"] is True
    assert seen["services"] == ("6", {"db": [], "web": ["v1"]})
    assert seen["service"] == ("6", [entry("web-1", "10.0.0.5", 80, ["v1"], 2)])
    assert seen["service_tag"] == ("6", [])
    assert seen["leader"] == LEADER
    assert seen["self"] == SELF_INFO
    assert seen["deregister"] is True
    assert seen["services_after"] == ("7", {"db": []})
    assert seen["bad_register"] == (
        "400 Port 70000 is invalid: give a number from 1 to 65535"
    )
    assert [(i.id, i.name, i.address, i.port, i.status) for i in stored] == [
        ("db-1", "db", "10.0.0.9", 5432, "passing")
    ]


async def test_catalog_nodes_lists_this_node_and_the_nodes_of_instances(api: Api) -> None:
    body, _ = await api.get_json("/v1/catalog/nodes")
    assert [(n["Node"], n["Address"]) for n in body] == [(NODE, NODE_ADDRESS)]
    await api.put("/v1/agent/service/register", WEB_1)  # from this node
    await api.registry.register(Instance(id="db-1", name="db", address="10.0.9.9", port=5432,
                                         node="node-b"))  # registered by another agent
    body, index = await api.get_json("/v1/catalog/nodes")
    assert body == [
        {"ID": "", "Node": NODE, "Address": NODE_ADDRESS, "Datacenter": DATACENTER,
         "TaggedAddresses": {"lan": NODE_ADDRESS, "wan": NODE_ADDRESS}, "Meta": {},
         "CreateIndex": 0, "ModifyIndex": 0},
        {"ID": "", "Node": "node-b", "Address": "10.0.9.9", "Datacenter": DATACENTER,
         "TaggedAddresses": {"lan": "10.0.9.9", "wan": "10.0.9.9"}, "Meta": {},
         "CreateIndex": 0, "ModifyIndex": 0},
    ]
    assert index == api.registry.index


# -- found by make fuzz -----------------------------------------------------------------


async def test_a_body_nested_too_deeply_is_400_and_stores_nothing(api: Api) -> None:
    """json.loads runs out of stack on deep nesting: a RecursionError and a 500 before."""
    raw = b"[" * 100_000 + b"]" * 100_000
    for path in ("/v1/agent/service/register", "/v1/agent/check/update/service:db-1"):
        assert await api.put(path, raw=raw) == (
            400, "Request decode failed: the JSON body is nested too deeply")
    assert (await api.registry.instances())[0] == []


async def test_an_index_of_other_digits_is_400(api: Api) -> None:
    async with api.client.get("/v1/catalog/services?index=⁰") as response:
        assert (response.status, await response.text()) == (
            400, "index '⁰' must be a non-negative integer")
