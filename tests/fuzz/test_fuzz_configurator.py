"""Fuzzing of the configurator's parsers of outside input: documents posted to its
REST API (bodies, ``/v1/config/<path>``, ``?template=``), the macros inside them,
the transformers that turn them into nginx/HAProxy/TOML text, and the store URI
and ``--wait`` of its command line.

The API target drives the real aiohttp application on 127.0.0.1 with a real file
store and target file (the TOML transformer, which needs no checker program);
there is no registry, so a ``$services`` answers 503, as it does in production
before the registry answers.
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from fuzzing import FUZZ, LoopRunner, corpus, digit_text, json_values, loop_runner, nested
from hypothesis import given
from hypothesis import strategies as st

from consulate.control.configurator import haproxy_cfg, macros, nginx_conf, paths, toml_out
from consulate.control.configurator.api import build_app
from consulate.control.configurator.engine import (
    CannotRender,
    Configurator,
    InvalidConfig,
    Template,
    render_all,
)
from consulate.control.configurator.quiescence import BadWait, parse_wait
from consulate.control.configurator.services import instance_fields
from consulate.control.configurator.store_uri import BadStoreUri, open_store
from consulate.control.configurator.stores import (
    FileStore,
    Store,
    StoreError,
    parse_document,
    pretty,
)
from consulate.control.configurator.target import TargetFile
from consulate.control.configurator.transform_errors import TransformError
from consulate.control.configurator.transformers import make_transformer
from consulate.control.registry.location import BadLocation, parse_location
from consulate.control.registry.model import Instance

pytestmark = pytest.mark.fuzz

DOCUMENTS = corpus("configurator_documents")
PATHS = corpus("config_paths")
FORMATS = ["{address}:{port}", "{id} {address}:{port} check", "{meta[zone]}", "{tags}",
           "{tags:d}", "{port:>{w}}", "{0}", "{}", "{address.__class__}", "{", "}",
           "{port!r}", "{port!z}", "{meta[nokey]}", "{tags[5]}", "{port:,}", "{name:%}"]
INSTANCES = [instance_fields(Instance(f"web-{n}", "web", f"10.0.0.{n}", 80 + n,
                                      tags=("v1",) if n % 2 else (), meta={"zone": "eu"}))
             for n in range(1, 4)]


def _macro(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Objects holding a macro, well-formed or not (two macros, unknown options,
    arguments of the wrong type)."""
    name = st.text(max_size=10) | inner
    return st.one_of(
        st.fixed_dictionaries({"$value": st.sampled_from(PATHS) | name},
                              optional={"default": inner}),
        st.fixed_dictionaries({"$file": st.sampled_from(["motd", "/nonexistent"]) | name},
                              optional={"default": inner}),
        st.fixed_dictionaries({"$env": st.sampled_from(["WORKERS", "NOPE"]) | name},
                              optional={"default": inner}),
        st.fixed_dictionaries({"$services": st.sampled_from(["web", "db", ""]) | name},
                              optional={"tag": st.sampled_from(["v1", "v2"]) | inner,
                                        "format": st.sampled_from(FORMATS) | name,
                                        "allow_empty": st.booleans() | inner}),
        st.fixed_dictionaries({"$if": inner}, optional={"then": inner, "else": inner}),
        st.dictionaries(st.sampled_from([*macros.MACROS, "default", "then", "nope"]), inner,
                        min_size=1, max_size=3))


documents = st.sampled_from(DOCUMENTS) | st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=10) | st.sampled_from(["http", "server",
                                                                             "listen"]),
                                     inner, max_size=4)
                   | _macro(inner)),
    max_leaves=25)


def _sources(document: Any) -> macros.Sources:
    def services(name: str) -> list[dict[str, Any]]:
        return INSTANCES if name == "web" else []
    return macros.Sources(document, {"WORKERS": "4"}, {"motd": "hello\n"}.get, services)


def _templates(where: Path) -> list[Template]:
    return [Template(make_transformer(spec), TargetFile(where / spec), "")
            for spec in ("nginx-conf", "haproxy-cfg", "toml")]


# -- the pipeline: macros, then every transformer ------------------------------------------


@FUZZ
@given(documents)
def test_render_documents(tmp_path: Path, document: Any) -> None:
    before = copy.deepcopy(document)
    try:
        rendered = render_all(document, _templates(tmp_path), _sources(document))
    except (InvalidConfig, CannotRender) as exc:
        assert str(exc)
    else:
        assert [r.template.transformer.name for r in rendered] == ["nginx-conf",
                                                                    "haproxy-cfg", "toml"]
    assert document == before


# -- each transformer's own contract on plain documents --------------------------------------


plain_documents = st.dictionaries(st.text(max_size=12), json_values, max_size=6)


@FUZZ
@given(plain_documents)
def test_nginx_conf_cannot_be_injected(document: dict[str, Any]) -> None:
    """What renders is one directive or block edge per line: a value cannot end a
    directive, open a block or start a line of its own."""
    try:
        text = nginx_conf.render(document)
    except TransformError as exc:
        assert str(exc)
        return
    lines = text.split("\n")[:-1]  # nginx ends lines at \n only
    assert all(line.endswith((";", "{", "}")) for line in lines)
    assert sum(line.endswith("{") for line in lines) == sum(
        line.strip() == "}" for line in lines)


@FUZZ
@given(plain_documents)
def test_haproxy_cfg_cannot_be_injected(document: dict[str, Any]) -> None:
    try:
        text = haproxy_cfg.render(document)
    except TransformError as exc:
        assert str(exc)
        return
    assert "#" not in text and "\r" not in text
    headers = [line for line in text.split("\n") if line and not line.startswith("    ")]
    assert len(headers) <= len(document)


@FUZZ
@given(plain_documents)
def test_toml_round_trips(document: dict[str, Any]) -> None:
    """What renders reads back (Python's own TOML parser) as the same document."""
    try:
        text = toml_out.render(document)
    except TransformError as exc:
        assert "TOML has no null" in str(exc)
        return
    assert tomllib.loads(text) == document


# -- /v1/config paths --------------------------------------------------------------------------


segments = st.lists(st.sampled_from(["http", "server", "servers", "0", "1", "-", "listen",
                                     "upstream app", "location /", ""])
                    | digit_text | st.text(max_size=8), max_size=5)


@st.composite
def paths_into(draw: st.DrawFn, document: Any) -> list[str]:
    """A path that follows the document's own keys and indexes for a while, then
    strays: the deep branches of the walk are where the checks are."""
    path: list[str] = []
    node = document
    while draw(st.integers(0, 4)):
        if isinstance(node, dict) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node)))
            path.append(key)
            node = node[key]
        elif isinstance(node, list) and node and draw(st.booleans()):
            index = draw(st.integers(0, len(node) - 1))
            path.append(str(index))
            node = node[index]
        else:
            path.append(draw(digit_text | segments.map("/".join)))
            node = None
    return path


@FUZZ
@given(st.data(), documents, json_values, st.sampled_from(["get", "put", "post", "delete"]))
def test_config_paths(data: st.DataObject, document: Any, value: Any, edit: str) -> None:
    path = data.draw(paths_into(document) | segments)
    before = copy.deepcopy(document)
    try:
        if edit == "get":
            paths.get(document, path)
        elif edit == "put":
            assert paths.get(paths.put(document, path, value), path) == value
        elif edit == "post":
            paths.post(document, path, value)
        else:
            paths.delete(document, path)
    except paths.PathError as exc:
        assert str(exc)
    assert document == before


@pytest.fixture
def runner() -> Iterator[LoopRunner]:
    with loop_runner() as running:
        yield running


# -- the REST API, end to end ----------------------------------------------------------------


class Api:
    def __init__(self, runner: LoopRunner, client: TestClient, store: Path) -> None:  # type: ignore[type-arg]
        self.runner = runner
        self.client = client
        self.store = store

    def call(self, method: str, url: str, body: bytes | None) -> tuple[int, str]:
        async def send() -> tuple[int, str]:
            response = await self.client.request(method, url, data=body)
            return response.status, await response.text()
        return self.runner.run(send())


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    store = tmp_path / "doc.json"
    store.write_bytes(pretty(DOCUMENTS[2]))
    configurator = Configurator(FileStore(store), [Template(
        make_transformer("toml"), TargetFile(tmp_path / "app.toml"), "")],
        environ={"WORKERS": "4"})

    async def start() -> TestClient:  # type: ignore[type-arg]
        await configurator.start()
        client = TestClient(TestServer(build_app(configurator), host="127.0.0.1"))
        await client.start_server()
        return client

    with loop_runner() as runner:
        client = runner.run(start())
        try:
            yield Api(runner, client, store)
        finally:
            runner.run(client.close())
            runner.run(configurator.close())


bodies = st.one_of(
    st.sampled_from(DOCUMENTS).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    documents.map(lambda d: json.dumps(d).encode()),
    st.sampled_from([60, 65, 500, 5000, 100_000]).map(nested),
    st.binary(max_size=40), st.just(b""), st.just(b"NaN"), st.just(b"[1e999]"))


@FUZZ
@given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       st.sampled_from(PATHS) | segments.map(lambda s: "/".join(quote(p, safe="") for p in s)),
       bodies)
def test_config_api(api: Api, method: str, path: str, body: bytes) -> None:
    """Every request gets an answer that says what was wrong, never a 500, and a
    refused edit leaves the stored document as it was."""
    stored = api.store.read_bytes()
    status, text = api.call(method, "/v1/config/" + path, body)
    assert status in (200, 204, 400, 404, 405, 409, 503), (status, text)
    if status >= 400:
        assert text.strip()
        assert api.store.read_bytes() == stored
        if status == 503:
            assert "$services" in text
    elif method != "GET":
        status, text = api.call("GET", "/v1/config", None)
        assert status == 200
        assert json.loads(text) == parse_document(api.store.read_bytes(), "store")
    if method == "PUT" and status == 200 and unquote(path).strip("/") == "":
        assert parse_document(api.store.read_bytes(), "store") == json.loads(body)


@FUZZ
@given(st.sampled_from(["GET", "POST"]), digit_text | st.text(max_size=6), bodies)
def test_render_api(api: Api, method: str, template: str, body: bytes) -> None:
    stored = api.store.read_bytes()
    status, text = api.call(method, "/v1/render?template=" + quote(template, safe=""),
                            body if method == "POST" else None)
    assert status in (200, 400, 404, 503), (status, text)
    assert api.store.read_bytes() == stored  # a dry run never commits


# -- the command line: store URIs and --wait --------------------------------------------------


@FUZZ
@given(st.sampled_from(corpus("store_uri")) | st.text(max_size=40)
       | st.tuples(st.sampled_from(["file://", "consul://", "consulate://", "etcd://"]),
                   st.text(max_size=30) | digit_text).map("".join))
def test_store_uris(runner: LoopRunner, text: str) -> None:
    async def opened() -> Store:  # the KV stores' clients need the running loop
        return open_store(text)
    try:
        store = runner.run(opened())
    except BadStoreUri as exc:
        assert repr(text) in str(exc)
        return
    try:
        if text.startswith("file://"):
            runner.run(store.load())
    except StoreError as exc:
        assert str(exc)
    finally:
        runner.run(store.close())


@FUZZ
@given(st.sampled_from(["embedded", *corpus("store_uri")]) | st.text(max_size=40)
       | st.tuples(st.sampled_from(["etcd://", "consul://", "http://"]),
                   st.text(max_size=30) | digit_text).map("".join))
def test_registry_locations(text: str) -> None:
    """``--registry``, which also says where ``$services`` reads instances."""
    try:
        location = parse_location(text)
    except BadLocation as exc:
        assert repr(text) in str(exc)
    else:
        assert all(0 < port < 65536 for _, port in location.endpoints)


@FUZZ
@given(st.sampled_from(corpus("wait")) | st.text(max_size=12)
       | st.tuples(digit_text, st.sampled_from(["", "s", "ms", ":", ":1s"])).map("".join))
def test_wait_option(text: str) -> None:
    try:
        wait = parse_wait(text)
    except BadWait as exc:
        assert repr(text) in str(exc)
    else:
        assert 0 <= wait.min <= wait.max
