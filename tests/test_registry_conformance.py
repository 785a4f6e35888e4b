"""One conformance suite for every registry backend: embedded, and etcd (a real one)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aetcd
import pytest
from aiohttp import web as aioweb
from etcdproc import EtcdProcess

from consulate.control.api_context import ApiContext
from consulate.control.http_api import build_app
from consulate.control.registry import EmbeddedRegistry, Instance, RegistryBackend, UnknownInstance
from consulate.control.registry.consul_agent import ConsulRegistry
from consulate.control.registry.etcd import EtcdRegistry
from consulate.control.registry.model import RegistryUnavailable

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    with EtcdProcess(tmp_path_factory.mktemp("etcd"), "127.42.0.1") as running:
        yield running


@pytest.fixture(params=["embedded", "etcd", "consul"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    registry: Any
    if request.param == "embedded":
        registry = EmbeddedRegistry(tmp_path / "registry.db")
        registry.start()
        yield registry
        await registry.close()
    elif request.param == "etcd":
        etcd: EtcdProcess = request.getfixturevalue("etcd")
        registry = EtcdRegistry([etcd.endpoint], prefix=f"/test{next(_prefixes)}")
        yield registry
        await registry.close()
    else:
        # No Consul server can run here: the consul backend (py-consul's asyncio
        # client) is tested against consulate's own Consul-compatible API, served
        # over a real socket from an embedded registry.
        behind = EmbeddedRegistry(tmp_path / "behind.db")
        behind.start()
        context = ApiContext(behind, node="n1", node_address="192.0.2.1", datacenter="dc1",
                             leader="192.0.2.1:8500", self_info=dict)
        runner = aioweb.AppRunner(build_app(context), access_log=None)
        await runner.setup()
        await aioweb.TCPSite(runner, "127.0.0.1", 0).start()
        registry = ConsulRegistry("127.0.0.1", runner.addresses[0][1])
        yield registry
        await registry.close()
        await runner.cleanup()
        await behind.close()


def web(n: int, **changes: Any) -> Instance:
    fields: dict[str, Any] = {"address": f"10.0.0.{n}", "port": 8080, **changes}
    return Instance(id=f"web-{n}", name="web", **fields)


async def test_register_sets_indexes_and_get_returns_them(backend: RegistryBackend) -> None:
    stored = await backend.register(web(1))
    assert stored.create_index == stored.modify_index > 0
    assert await backend.get("web-1") == stored
    assert backend.index >= stored.modify_index
    assert await backend.get("nope") is None


async def test_same_registration_again_changes_nothing(backend: RegistryBackend) -> None:
    first = await backend.register(web(1, tags=("a",)))
    again = await backend.register(web(1, tags=("a",)))
    assert again == first


async def test_changed_registration_keeps_its_age(backend: RegistryBackend) -> None:
    first = await backend.register(web(1))
    moved = await backend.register(web(1, port=9090))
    assert moved.port == 9090
    assert moved.create_index == first.create_index  # registration age survives
    assert moved.modify_index > first.modify_index


async def test_unknown_ids_are_refused(backend: RegistryBackend) -> None:
    with pytest.raises(UnknownInstance):
        await backend.deregister("ghost")
    with pytest.raises(UnknownInstance):
        await backend.heartbeat("ghost")


async def test_instances_by_service_sorted_by_id(backend: RegistryBackend) -> None:
    for n in (3, 1, 2):
        await backend.register(web(n))
    await backend.register(Instance(id="db-1", name="db", address="10.0.1.1", port=5432))
    webs, index = await backend.instances("web")
    assert [i.id for i in webs] == ["web-1", "web-2", "web-3"]
    assert index >= max(i.modify_index for i in webs)
    everything, _ = await backend.instances()
    assert [i.id for i in everything] == ["db-1", "web-1", "web-2", "web-3"]
    assert (await backend.instances("nothing"))[0] == []


async def test_deregister_removes_and_grows_the_index(backend: RegistryBackend) -> None:
    stored = await backend.register(web(1))
    index = await backend.deregister("web-1")
    assert index > stored.modify_index
    assert await backend.get("web-1") is None
    assert (await backend.instances("web"))[0] == []


async def test_watch_starts_with_a_snapshot_then_streams_changes(backend: RegistryBackend) -> None:
    await backend.register(web(1))
    changes = backend.watch()
    snapshot = await anext(changes)
    assert (snapshot.kind, [i.id for i in snapshot.instances]) == ("snapshot", ["web-1"])
    await backend.register(web(2))
    await backend.deregister("web-1")
    seen = [await asyncio.wait_for(anext(changes), 5) for _ in range(2)]
    # A polling backend (consul) may see both writes in one read: the order then
    # is downs first, with one index; stream backends keep each write's own index.
    assert {(c.kind, c.instances[0].id) for c in seen} == {("up", "web-2"), ("down", "web-1")}
    assert snapshot.index < seen[0].index <= seen[1].index
    await changes.aclose()  # type: ignore[attr-defined]


async def test_ttl_instance_expires_without_heartbeats(backend: RegistryBackend) -> None:
    await backend.register(web(1, ttl=2.0))
    await backend.register(web(2, ttl=2.0))
    changes = backend.watch()
    await anext(changes)  # the snapshot
    for _ in range(3):  # web-2 is kept alive across more than one TTL
        await asyncio.sleep(0.9)
        await backend.heartbeat("web-2")
    down = await asyncio.wait_for(anext(changes), 6)
    assert (down.kind, down.instances[0].id) == ("down", "web-1")
    assert await backend.get("web-1") is None
    assert await backend.get("web-2") is not None
    await changes.aclose()  # type: ignore[attr-defined]


async def test_wait_for_index_wakes_on_a_change_or_times_out(backend: RegistryBackend) -> None:
    stored = await backend.register(web(1))
    assert await backend.wait_for_index(stored.modify_index, 0.3) == stored.modify_index
    waiter = asyncio.ensure_future(backend.wait_for_index(stored.modify_index, 10))
    await asyncio.sleep(0.1)
    changed = await backend.register(web(2))
    assert await asyncio.wait_for(waiter, 5) >= changed.modify_index


async def test_concurrent_registrations_lose_nothing(backend: RegistryBackend) -> None:
    stored = await asyncio.gather(*(backend.register(web(n)) for n in range(50)))
    assert len({i.modify_index for i in stored}) == 50  # one index per write
    held, index = await backend.instances("web")
    assert len(held) == 50
    assert index >= max(i.modify_index for i in stored)


async def test_etcd_watch_resyncs_after_compaction(etcd: EtcdProcess) -> None:
    registry = EtcdRegistry([etcd.endpoint], prefix=f"/test{next(_prefixes)}")
    try:
        first = await registry.register(web(1))
        await registry.register(web(2))
        await registry.deregister("web-1")
        etcd.compact()
        # A watcher resuming from before the compaction cannot replay: it reads
        # the set again and emits the difference with what it last knew.
        changes = registry.watch(first.modify_index)
        seen = [await asyncio.wait_for(anext(changes), 5)]
        assert (seen[0].kind, seen[0].instances[0].id) == ("up", "web-2")
        await changes.aclose()  # type: ignore[attr-defined]
    finally:
        with contextlib.suppress(Exception):
            await registry.close()


async def test_etcd_keep_alive_of_an_expired_lease_is_not_a_renewal(etcd: EtcdProcess) -> None:
    """etcd answers a keep-alive for a lease that ran out with TTL 0, not an error, and
    the lease's keys can outlive it for a moment: that answer must read as lost (an
    agent that took it for a renewal would then forget its own instance)."""
    registry = EtcdRegistry([etcd.endpoint], prefix=f"/test{next(_prefixes)}")
    client = aetcd.Client(host=etcd.address, port=2379)
    try:
        live = await client.lease(30)
        gone = await client.lease(30)
        await client.revoke_lease(gone.id)
        assert await registry._renew(live.id) is True
        assert await registry._renew(gone.id) is False
    finally:
        await client.close()
        await registry.close()


async def test_etcd_watch_survives_a_restart_and_reports_what_vanished(
    tmp_path: Path,
) -> None:
    with EtcdProcess(tmp_path / "etcd", "127.42.0.2") as etcd:
        registry = EtcdRegistry([etcd.endpoint])
        other = EtcdRegistry([etcd.endpoint])  # another agent of the cluster
        try:
            await registry.register(web(1))
            await registry.register(web(2))
            changes = registry.watch()
            await anext(changes)  # the snapshot
            etcd.stop()
            pending = asyncio.ensure_future(anext(changes))  # reconnecting meanwhile
            await asyncio.sleep(0.5)
            etcd.start()
            await other.deregister("web-1")
            down = await asyncio.wait_for(pending, 15)
            assert (down.kind, down.instances[0].id) == ("down", "web-1")
            await other.register(web(3))
            up = await asyncio.wait_for(anext(changes), 5)
            assert (up.kind, up.instances[0].id) == ("up", "web-3")
            assert up.index > down.index
            await changes.aclose()  # type: ignore[attr-defined]
        finally:
            await registry.close()
            await other.close()


async def test_etcd_watch_follows_an_etcd_back_without_its_data(tmp_path: Path) -> None:
    """etcd restarted empty counts its revisions from 1 again: the watch reads the set
    when it can and follows from there (not from its old, higher position), so the
    old instances go down and a new one comes up, and the registry's index starts
    again from etcd's (a blocking query would otherwise wait for an index far ahead).
    (The old code also followed from its old position when a re-read failed and the
    watch creation after it did not: that ordering is left to chance here.)"""
    with EtcdProcess(tmp_path / "etcd", "127.42.0.5") as etcd:
        registry = EtcdRegistry([etcd.endpoint])
        other = EtcdRegistry([etcd.endpoint])
        changes = registry.watch()
        try:
            for n in range(1, 6):
                await other.register(web(n))
            snapshot = await anext(changes)
            assert [i.id for i in snapshot.instances] == [f"web-{n}" for n in range(1, 6)]
            before = registry.index
            etcd.stop()
            shutil.rmtree(tmp_path / "etcd" / "data")
            pending = asyncio.ensure_future(anext(changes))
            await asyncio.sleep(1)  # the watch retries against nothing meanwhile
            etcd.start()
            await other.register(web(9))
            seen: list[tuple[str, str]] = []
            change = await asyncio.wait_for(pending, 30)
            while True:
                seen += [(change.kind, i.id) for i in change.instances]
                if ("up", "web-9") in seen:
                    break
                change = await asyncio.wait_for(anext(changes), 30)
            assert sorted(seen) == [("down", f"web-{n}") for n in range(1, 6)] + [("up", "web-9")]
            fresh = EtcdRegistry([etcd.endpoint])
            try:
                _, revision = await fresh.instances()
            finally:
                await fresh.close()
            assert registry.index == revision < before
        finally:
            await changes.aclose()  # type: ignore[attr-defined]
            await registry.close()
            await other.close()


async def test_etcd_watch_survives_a_hung_member(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A member that hangs (SIGSTOP: its connections stay open, nothing resets them)
    stalls an established watch stream: keepalive finds it dead, the watch reports it
    and each failed attempt after it (re-reads that time out), and delivers the next
    change once the member answers again."""
    caplog.set_level(logging.WARNING, "consulate.registry.etcd")
    with EtcdProcess(tmp_path / "etcd", "127.42.0.4") as etcd:
        registry = EtcdRegistry([etcd.endpoint])
        other = EtcdRegistry([etcd.endpoint])
        changes = registry.watch()
        pending: asyncio.Future[Any] | None = None
        try:
            await anext(changes)  # the snapshot
            await other.register(web(1))
            first = await asyncio.wait_for(anext(changes), 10)  # the stream is up
            assert (first.kind, first.instances[0].id) == ("up", "web-1")
            pending = asyncio.ensure_future(anext(changes))
            etcd.freeze()
            try:
                deadline = time.monotonic() + 60
                while len(_reconnects(caplog, etcd)) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                assert len(_reconnects(caplog, etcd)) >= 2, caplog.text
                assert not pending.done()
            finally:
                etcd.freeze(False)
            await other.register(web(2))
            up = await asyncio.wait_for(pending, 30)
            assert (up.kind, [i.id for i in up.instances]) == ("up", ["web-2"])
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
            await changes.aclose()  # type: ignore[attr-defined]
            await registry.close()
            await other.close()


def _reconnects(caplog: pytest.LogCaptureFixture, etcd: EtcdProcess) -> list[str]:
    """The watch's reconnect lines about this etcd (not another test's)."""
    mark = f"event=watch-reconnect etcd={etcd.address}:2379 "
    return [r.getMessage() for r in caplog.records if mark in r.getMessage()]


async def test_etcd_down_is_a_clear_error(tmp_path: Path) -> None:
    registry = EtcdRegistry([("127.42.0.3", 2379)])  # nothing listens there
    try:
        with pytest.raises(RegistryUnavailable,
                           match=r"etcd at 127\.42\.0\.3:2379 is not answering"):
            await registry.register(web(1))
    finally:
        await registry.close()


async def test_kv_put_get_list_delete(backend: RegistryBackend) -> None:
    assert await backend.kv_put("app/config", b"\x00binary\xff", flags=42)
    entry = await backend.kv_get("app/config")
    assert entry is not None
    assert (entry.key, entry.value, entry.flags) == ("app/config", b"\x00binary\xff", 42)
    assert entry.create_index == entry.modify_index > 0
    await backend.kv_put("app/db/url", b"pg://")
    await backend.kv_put("other", b"x")
    entries, index = await backend.kv_list("app/")
    assert [e.key for e in entries] == ["app/config", "app/db/url"]
    assert index >= max(e.modify_index for e in entries)
    assert await backend.kv_put("app/config", b"v2")
    updated = await backend.kv_get("app/config")
    assert updated is not None and updated.create_index == entry.create_index
    assert updated.modify_index > entry.modify_index
    assert await backend.kv_delete("app/", recurse=True)
    assert [e.key for e in (await backend.kv_list(""))[0]] == ["other"]
    assert await backend.kv_get("app/config") is None


async def test_kv_compare_and_set_elects_one_leader(backend: RegistryBackend) -> None:
    # Ten candidates race to create the key (cas=0: only if absent): one wins.
    won = await asyncio.gather(*(backend.kv_put("leader", f"n{n}".encode(), cas=0)
                                 for n in range(10)))
    assert won.count(True) == 1
    entry = await backend.kv_get("leader")
    assert entry is not None and entry.value == f"n{won.index(True)}".encode()
    assert not await backend.kv_put("leader", b"late", cas=entry.modify_index - 1)
    assert await backend.kv_put("leader", b"handover", cas=entry.modify_index)
    assert not await backend.kv_delete("leader", cas=entry.modify_index)  # stale index
    current = await backend.kv_get("leader")
    assert current is not None
    assert await backend.kv_delete("leader", cas=current.modify_index)


async def test_a_kv_write_wakes_blocking_queries_and_sends_watchers_nothing(
    backend: RegistryBackend,
) -> None:
    stored = await backend.register(web(1))
    changes = backend.watch()
    await anext(changes)  # the snapshot
    waiter = asyncio.ensure_future(backend.wait_for_index(backend.index, 10))
    await asyncio.sleep(0.1)
    await backend.kv_put("k", b"v")
    assert await asyncio.wait_for(waiter, 5) > stored.modify_index
    await backend.register(web(2))
    up = await asyncio.wait_for(anext(changes), 5)  # the next change, no snapshot before it
    assert (up.kind, up.instances[0].id) == ("up", "web-2")
    await changes.aclose()  # type: ignore[attr-defined]
