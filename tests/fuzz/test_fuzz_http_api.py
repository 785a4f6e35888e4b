"""Fuzzing of the agent's HTTP API beyond single parsers: query strings on every read
(``?tag``, ``?near``, ``?dc``, ``?passing``, ``?recurse``/``?keys``/``?separator``,
``?raw``, ``?index``, ``?filter``...), KV keys, ``?cas``/``?flags`` and values, and
the JSON bodies of registrations, TTL check updates and Discoverd instances.

The agent's real application (Consul-compatible API and Discoverd API, as the
agent mounts them) serves on 127.0.0.1 over an embedded registry. Registrations
are sent without checks: a fuzzed HTTP or TCP check would make the agent probe
whatever address it names, and the checks' grammar is fuzzed without I/O in
test_fuzz_parsers.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from apiclient import make_context
from fuzzing import FUZZ, LoopRunner, corpus, digit_text, json_values, loop_runner, nested
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from consulate.control import discover_api
from consulate.control.discover_api import parse_instance
from consulate.control.http_api import build_app
from consulate.control.registry import EmbeddedRegistry
from consulate.control.registry.hub import WatchHub
from consulate.control.registry.model import KVEntry
from consulate.control.service_definition import InvalidDefinition

pytestmark = pytest.mark.fuzz

READS = ["/v1/catalog/services", "/v1/catalog/nodes", "/v1/catalog/service/web",
         "/v1/agent/services", "/v1/agent/checks", "/v1/agent/self", "/v1/status/leader",
         "/v1/health/service/web", "/v1/health/checks/db", "/v1/health/state/any",
         "/v1/health/state/passing", "/v1/health/state/bogus", "/v1/kv/app/", "/v1/kv/app/a",
         "/v1/kv/", "/v1/discover/services/web/instances", "/v1/discover/services/web/leader"]
PARAMETERS = ["tag", "near", "dc", "passing", "recurse", "keys", "separator", "raw", "index",
              "wait", "filter", "stale", "consistent", "format", "cas", "flags", "note"]
KEYS = ["app/a", "app/new", "app/db/url", "", "app/", "a b", "ü", "x" * 600, "%2F", "app//b"]


@dataclass
class Agent:
    runner: LoopRunner
    client: TestClient  # type: ignore[type-arg]
    registry: EmbeddedRegistry

    def call(self, method: str, url: str, body: bytes | None = None
             ) -> tuple[int, bytes, str]:
        async def send() -> tuple[int, bytes, str]:
            response = await self.client.request(method, URL(url, encoded=True), data=body)
            return response.status, await response.read(), response.content_type
        return self.runner.run(send())

    def kv(self) -> list[KVEntry]:
        entries: list[KVEntry] = self.runner.run(self.registry.kv_list(""))[0]
        return entries

    def instance_ids(self) -> list[str]:
        return sorted(i.id for i in self.runner.run(self.registry.instances())[0])


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with loop_runner() as runner:
        registry = EmbeddedRegistry(tmp_path / "registry.db")
        hub = WatchHub(registry)

        async def start() -> TestClient:  # type: ignore[type-arg]
            registry.start()
            await hub.start()
            app = build_app(make_context(registry))
            discover_api.add_routes(app, registry, hub, node="node-a")
            client: TestClient[web.Request, web.Application] = TestClient(
                TestServer(app, host="127.0.0.1"))
            await client.start_server()
            return client

        client = runner.run(start())
        subject = Agent(runner, client, registry)
        for number, tags in ((1, ["v1"]), (2, ["v1", "v2"])):
            assert subject.call("PUT", "/v1/agent/service/register", json.dumps(
                {"ID": f"web-{number}", "Name": "web", "Address": f"10.0.0.{number}",
                 "Port": 80, "Tags": tags}).encode())[0] == 200
        assert subject.call("PUT", "/v1/agent/service/register", json.dumps(
            {"ID": "db-1", "Name": "db", "Port": 5432, "Check": {"TTL": "1h"}}).encode())[0] == 200
        for key in ("app/a", "app/db/url", "app/db/user"):
            assert subject.call("PUT", f"/v1/kv/{key}", key.encode())[0] == 200
        try:
            yield subject
        finally:
            runner.run(client.close())
            runner.run(hub.close())
            runner.run(registry.close())


values = st.sampled_from(["", "0", "1", "v1", "/", "false", "_agent", "dc1"]) | digit_text \
    | st.text(max_size=20)
pairs = st.lists(st.tuples(st.sampled_from(PARAMETERS) | st.text(max_size=6), values),
                 max_size=5)
queries = st.sampled_from([[tuple(pair) for pair in query]
                           for query in corpus("api_queries")]) | pairs


def query_string(query: list[tuple[str, str]]) -> str:
    """The pairs, URL-encoded; a blocking read waits 1 ms at most (its own wait
    values are fuzzed in test_fuzz_parsers, without a server to block)."""
    if any(name == "index" for name, _ in query):
        query = [("wait", "1ms"), *query]
    return urlencode(query)


@FUZZ
@given(st.sampled_from(READS), queries)
def test_read_query_strings(agent: Agent, path: str, query: list[tuple[str, str]]) -> None:
    status, body, content_type = agent.call("GET", f"{path}?{query_string(query)}")
    assert status in (200, 400, 404), (status, body)
    if status == 200 and content_type == "application/json":
        json.loads(body)
    elif status != 200:
        assert body.strip() or status == 404  # Consul answers a KV miss with no body


@FUZZ
@given(st.sampled_from(["PUT", "DELETE", "GET"]), st.sampled_from(KEYS) | st.text(max_size=12),
       st.lists(st.tuples(st.sampled_from(["flags", "cas", "recurse", "raw"]), values),
                max_size=3),
       st.sampled_from(corpus("kv_bodies")).map(str.encode) | st.binary(max_size=300)
       | st.just(b"x" * (512 * 1024 + 1)))
def test_kv(agent: Agent, method: str, key: str, query: list[tuple[str, str]],
            value: bytes) -> None:
    """A write answers true, false (a compare-and-set that did not match) or an
    error; whatever it answers, the store holds exactly what it says."""
    before = agent.kv()
    url = f"/v1/kv/{quote(key, safe='/')}?{urlencode(query)}"
    status, body, _ = agent.call(method, url, value if method == "PUT" else None)
    assert status in (200, 400, 404, 413), (status, body[:200])
    if status != 200 or method == "GET" or json.loads(body) is False:
        assert agent.kv() == before
        return
    if method == "PUT":
        found = {e.key: e for e in agent.kv()}[key]
        flags = next((value for name, value in query if name == "flags"), "0")
        assert (found.value, found.flags) == (value, int(flags))
        status, raw, _ = agent.call("GET", f"/v1/kv/{quote(key, safe='/')}?raw")
        assert (status, raw) == (200, value)
        status, listed, _ = agent.call("GET", f"/v1/kv/{quote(key, safe='/')}")
        [entry] = json.loads(listed)
        assert base64.b64decode(entry["Value"] or "") == value


def _without_checks(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: v for k, v in body.items() if k.lower() not in ("check", "checks")}
    return body


registration_bodies = st.one_of(
    st.sampled_from(corpus("registration")).map(_without_checks),
    st.dictionaries(st.sampled_from(["ID", "Name", "Port", "Address", "Tags", "Meta",
                                     "Weights", "EnableTagOverride"]), json_values,
                    max_size=6),
    json_values.map(_without_checks)).map(lambda body: json.dumps(body).encode()) \
    | st.sampled_from([500, 5000, 100_000]).map(nested) | st.binary(max_size=40)


@FUZZ
@given(registration_bodies)
def test_registration_bodies(agent: Agent, body: bytes) -> None:
    before = agent.instance_ids()
    status, text, _ = agent.call("PUT", "/v1/agent/service/register", body)
    assert status in (200, 400), (status, text)
    if status == 400:
        assert text.strip()
        assert agent.instance_ids() == before


@FUZZ
@given(st.sampled_from(["service:db-1", "db-1", "nope"]),
       st.fixed_dictionaries({}, optional={"Status": st.sampled_from(["passing", "warning",
                                                                      "critical", "ok"])
                                           | json_values,
                                           "Output": json_values}).map(
           lambda body: json.dumps(body).encode())
       | st.sampled_from([500, 5000, 100_000]).map(nested) | st.binary(max_size=20))
def test_check_update_bodies(agent: Agent, check_id: str, body: bytes) -> None:
    status, text, _ = agent.call("PUT", f"/v1/agent/check/update/{check_id}", body)
    assert status in (200, 400, 404), (status, text)


discover_bodies = st.fixed_dictionaries({}, optional={
    "addr": st.sampled_from(["10.0.0.5:8080", "10.0.0.5:0", "10.0.0.5:²", ":80", "x:1"])
    | st.tuples(st.sampled_from(["10.0.0.5:", "127.0.0.1:"]), digit_text).map("".join)
    | json_values,
    "proto": st.sampled_from(["tcp", "udp", "sctp"]) | json_values,
    "meta": json_values, "tags": json_values, "ttl": json_values}) \
    | st.dictionaries(st.text(max_size=6), json_values, max_size=3) | json_values


@FUZZ
@given(st.sampled_from(["web", "", "a/b", "x" * 70]) | st.text(max_size=10),
       st.sampled_from(["web-9", "", "a/b"]) | st.text(max_size=10), discover_bodies)
def test_discoverd_instance_bodies(name: str, instance_id: str, body: Any) -> None:
    before = copy.deepcopy(body)
    try:
        instance = parse_instance(name, instance_id, body, "node-a")
    except InvalidDefinition as exc:
        assert str(exc)
    else:
        assert (instance.name, instance.id) == (name, instance_id)
        assert 1 <= instance.port <= 65535
    assert body == before


@FUZZ
@given(discover_bodies.map(lambda body: json.dumps(body).encode())
       | st.sampled_from([500, 5000, 100_000]).map(nested) | st.binary(max_size=20))
def test_discoverd_http_bodies(agent: Agent, body: bytes) -> None:
    status, text, _ = agent.call("PUT", "/v1/discover/services/web/instances/web-9", body)
    assert status in (200, 400), (status, text)
    if status == 200:
        assert agent.call("DELETE", "/v1/discover/services/web/instances/web-9")[0] == 200
