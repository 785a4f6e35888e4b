"""The stores, one suite over each: a file, consulate's KV API (consulate:// and
consul://) and a real etcd.

There is no Consul server here: consul:// talks to consulate's own
Consul-compatible KV API (a real aiohttp server on 127.0.0.1), as py-consul would
talk to Consul.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from etcdproc import EtcdProcess
from registrator_support import loopback_address

from consulate.control.api_context import ApiContext
from consulate.control.configurator.engine import Configurator, Template
from consulate.control.configurator.store_uri import BadStoreUri, open_store
from consulate.control.configurator.stores import Conflict, Store, StoreError, pretty
from consulate.control.configurator.target import TargetFile
from consulate.control.configurator.transformers import make_transformer
from consulate.control.http_api import build_app
from consulate.control.registry import EmbeddedRegistry


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    with EtcdProcess(tmp_path_factory.mktemp("etcd"), loopback_address()) as running:
        yield running


@pytest.fixture
async def agent_api(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedRegistry, int]]:
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    registry.start()
    context = ApiContext(registry, node="n1", node_address="127.0.0.1", datacenter="dc1",
                         leader="127.0.0.1:8500", self_info=dict)
    server = TestServer(build_app(context), host="127.0.0.1")
    await server.start_server()
    yield registry, server.port or 0
    await server.close()
    await registry.close()


@pytest.fixture(params=["file", "consulate", "consul", "etcd"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    kind = request.param
    if kind == "file":
        return f"file://{tmp_path}/doc.json"
    if kind == "etcd":
        etcd = request.getfixturevalue("etcd")
        return f"etcd://{etcd.address}:2379/test-{os.urandom(4).hex()}"
    _, port = request.getfixturevalue("agent_api")
    return f"{kind}://127.0.0.1:{port}/app/nginx"


@pytest.fixture
async def store(store_uri: str) -> AsyncIterator[Store]:
    opened = open_store(store_uri)
    yield opened
    await opened.close()


async def test_load_save_and_compare_and_set(store: Store, store_uri: str) -> None:
    empty = await store.load()
    assert empty.document == {}
    saved = await store.save({"a": 1}, empty)
    assert saved.document == {"a": 1} and saved.version != empty.version
    assert (await store.load()).document == {"a": 1}
    with pytest.raises(Conflict):
        await store.save({"a": 2}, empty)  # a stale version
    assert (await store.load()).document == {"a": 1}
    assert store.describe == store_uri


async def test_wait_returns_on_another_writer(store: Store, store_uri: str) -> None:
    first = await store.save({"n": 0}, await store.load())
    seen = await store.load()
    other = open_store(store_uri)
    try:
        waiting = asyncio.ensure_future(store.wait(seen, 20))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await other.save({"n": 1}, await other.load())
        found = await asyncio.wait_for(waiting, 15)
    finally:
        await other.close()
    assert found.document == {"n": 1} and found.version != first.version
    quiet = await store.wait(found, 1)
    assert quiet.version == found.version


async def test_edit_retries_after_a_concurrent_write(store: Store, store_uri: str,
                                                     tmp_path: Path) -> None:
    """The first attempt loses the compare-and-set to another writer; the edit is
    applied again to the fresh document and both changes are kept."""
    await store.save({"a": 1}, await store.load())
    template = Template(make_transformer("toml"), TargetFile(tmp_path / "out.toml"), "")
    configurator = Configurator(store, [template])
    await configurator.start()
    other = open_store(store_uri)
    calls = 0
    raced = False  # the configurator's own watch reads through load() too: race once

    def change(document: Any) -> Any:
        nonlocal calls
        calls += 1
        return {**document, "b": 2}

    try:
        original = store.load

        async def load_then_race() -> Any:
            nonlocal raced
            snapshot = await original()
            if not raced:
                raced = True
                await other.save({**snapshot.document, "c": 3}, await other.load())
            return snapshot

        store.load = load_then_race  # type: ignore[method-assign]
        assert await configurator.edit(change) == {"a": 1, "c": 3, "b": 2}
    finally:
        store.load = original  # type: ignore[method-assign]
        await other.close()
        await configurator.close()
    assert calls == 2
    assert (tmp_path / "out.toml").read_text() == "a = 1\nc = 3\nb = 2\n"


async def test_file_store_pretty_and_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    store = open_store(f"file://{path}")
    await store.save({"b": [1, {"c": "é"}]}, await store.load())
    assert path.read_bytes() == pretty({"b": [1, {"c": "é"}]})
    assert path.read_text() == '{\n  "b": [\n    1,\n    {\n      "c": "é"\n    }\n  ]\n}\n'
    path.write_text("{broken")
    with pytest.raises(StoreError) as caught:
        await store.load()
    assert str(caught.value).startswith(f"file://{path} does not hold JSON (")
    assert str(caught.value).endswith("): fix or remove it")


async def test_kv_document_is_plain_json_under_the_prefix(
        agent_api: tuple[EmbeddedRegistry, int]) -> None:
    registry, port = agent_api
    store = open_store(f"consulate://127.0.0.1:{port}/app/nginx/")
    try:
        await store.save({"x": 1}, await store.load())
    finally:
        await store.close()
    entry = await registry.kv_get("app/nginx/config")
    assert entry is not None and json.loads(entry.value) == {"x": 1}


async def test_unreachable_kv_store_names_it() -> None:
    store = open_store("consulate://127.0.0.1:9/app")
    try:
        with pytest.raises(StoreError) as caught:
            await store.load()
    finally:
        await store.close()
    assert str(caught.value).startswith("KV store consulate://127.0.0.1:9/app is not "
                                        "answering (read: ")


@pytest.mark.parametrize(("uri", "message"), [
    ("http://x/y", "store 'http://x/y' is unknown: use file://PATH, consulate://HOST:PORT/"
     "PREFIX, consul://HOST:PORT/PREFIX or etcd://HOST:PORT[,HOST:PORT...]/PREFIX"),
    ("consul://127.0.0.1:8500", "store 'consul://127.0.0.1:8500': add a key prefix, such as "
     "consul://127.0.0.1:8500/nginx"),
    ("consul://a,b/x", "store 'consul://a,b/x': one HOST:PORT only"),
    ("etcd://localhost:2379/x", "store 'etcd://localhost:2379/x': 'localhost' is not an "
     "IPv4 address"),
    ("etcd://127.0.0.1/x", "store 'etcd://127.0.0.1/x': '127.0.0.1' is not HOST:PORT"),
    ("file://", "store 'file://': name a JSON file"),
    ("file:///nonexistent-dir/x.json", "store 'file:///nonexistent-dir/x.json': the "
     "directory '/nonexistent-dir' does not exist: create it first"),
])
def test_bad_store_uris(uri: str, message: str) -> None:
    with pytest.raises(BadStoreUri) as caught:
        open_store(uri)
    assert str(caught.value).startswith(message)


async def test_etcd_watch_after_compaction_reads_the_key_again(etcd: EtcdProcess,
                                                               tmp_path: Path) -> None:
    store = open_store(f"etcd://{etcd.address}:2379/compact-{os.urandom(4).hex()}")
    try:
        seen = await store.save({"n": 0}, await store.load())
        latest = await store.save({"n": 1}, await store.load())
        latest = await store.save({"n": 2}, latest)
        etcd.compact()  # the revisions after `seen` are gone from etcd's history
        found = await asyncio.wait_for(store.wait(seen, 10), 20)
    finally:
        await store.close()
    assert (found.document, found.version) == ({"n": 2}, latest.version)


# -- found by make fuzz -----------------------------------------------------------------


@pytest.mark.parametrize(("uri", "message"), [
    ("file://\x00", "store 'file://\\x00': a file name cannot hold a NUL character"),
    ("consul://[", "store 'consul://[': Invalid IPv6 URL; use file://PATH, consulate://"
     "HOST:PORT/PREFIX, consul://HOST:PORT/PREFIX or etcd://HOST:PORT[,HOST:PORT...]/PREFIX"),
])
def test_store_uris_that_crashed_are_refused(uri: str, message: str) -> None:
    with pytest.raises(BadStoreUri) as caught:
        open_store(uri)
    assert str(caught.value) == message


@pytest.mark.parametrize("depth", [65, 100_000])
async def test_a_stored_document_nested_too_deeply_is_a_store_error(tmp_path: Path,
                                                                    depth: int) -> None:
    path = tmp_path / "doc.json"
    path.write_bytes(b"[" * depth + b"]" * depth)
    with pytest.raises(StoreError) as caught:
        await open_store(f"file://{path}").load()
    assert str(caught.value) == (f"file://{path} nests arrays and objects more than 64 "
                                 "levels deep: flatten it")


async def test_an_etcd_watch_a_hung_member_never_acknowledges_is_a_store_error(
    tmp_path: Path,
) -> None:
    """A hung member (SIGSTOP) never acknowledges the watch: that is "not answering",
    the StoreError the configurator's watch retries, not an error that ends it."""
    with EtcdProcess(tmp_path / "etcd", loopback_address()) as etcd:
        store = open_store(f"etcd://{etcd.address}:2379/hung")
        try:
            seen = await store.load()  # the connection is up before the member hangs
            etcd.freeze()
            try:
                with pytest.raises(StoreError, match=rf"^KV store etcd://{etcd.address}:2379/"
                                   r"hung is not answering \(watch: WatchTimeoutError\): start "
                                   r"etcd there, or use a file:// store$"):
                    await store.wait(seen, 30)
            finally:
                etcd.freeze(False)
        finally:
            await store.close()
