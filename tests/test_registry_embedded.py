"""The embedded registry (control/registry/embedded.py): indexes, TTLs, SQLite, watches."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from consulate.control.registry import (
    Change,
    EmbeddedRegistry,
    Instance,
    RegistryError,
    UnknownInstance,
)
from consulate.control.registry.embedded import CHANGE_LOG_LENGTH

STEP = 1.0  # the longest any single awaited event may take


def web(instance_id: str = "web-1", port: int = 80, **kwargs: object) -> Instance:
    return Instance(id=instance_id, name="web", address="10.0.0.5", port=port, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "registry.db"


def start(reg: EmbeddedRegistry) -> asyncio.Task[None]:
    """Start the registry; returns its reaper task (found through asyncio, not internals)."""
    before = asyncio.all_tasks()
    reg.start()
    (reaper,) = asyncio.all_tasks() - before
    return reaper  # type: ignore[return-value]


async def close_within(reg: EmbeddedRegistry, reaper: asyncio.Task[None], limit: float) -> bool:
    """Close the registry; False when close() did not return within ``limit`` seconds.

    On a hang the reaper is cancelled again so that the test still ends cleanly.
    """
    closing = asyncio.ensure_future(reg.close())
    done, _ = await asyncio.wait({closing}, timeout=limit)
    if done:
        await closing
        return True
    reaper.cancel()
    await asyncio.wait({closing, reaper}, timeout=STEP)
    assert closing.done() and reaper.done()
    return False


@pytest.fixture
async def registry(db_path: Path) -> AsyncIterator[EmbeddedRegistry]:
    reg = EmbeddedRegistry(db_path)
    reaper = start(reg)
    yield reg
    assert await close_within(reg, reaper, STEP), "close() hung"


async def next_change(changes: AsyncIterator[Change]) -> Change:
    return await asyncio.wait_for(anext(changes), STEP)


def ids(instances: list[Instance] | tuple[Instance, ...]) -> list[str]:
    return [i.id for i in instances]


def rows_in_db(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(str(path))) as db:
        return [r[0] for r in db.execute("SELECT id FROM instances ORDER BY id")]


# -- indexes ----------------------------------------------------------------------


async def test_fresh_registry_is_empty(registry: EmbeddedRegistry) -> None:
    # Index 1, as an empty etcd: the API never says 0, and no write may say 1.
    assert registry.index == 1
    assert await registry.instances() == ([], 1)


async def test_register_returns_the_instance_with_indexes(registry: EmbeddedRegistry) -> None:
    stored = await registry.register(web(tags=("v1",), meta={"k": "v"}))
    assert stored == Instance(id="web-1", name="web", address="10.0.0.5", port=80,
                              tags=("v1",), meta={"k": "v"}, create_index=2, modify_index=2)
    assert registry.index == 2
    second = await registry.register(web("web-2"))
    assert (second.create_index, second.modify_index) == (3, 3)
    assert await registry.get("web-1") == stored
    assert await registry.get("nope") is None


async def test_reregistering_the_same_definition_changes_no_index(
    registry: EmbeddedRegistry,
) -> None:
    first = await registry.register(web(tags=("v1",)))
    again = await registry.register(web(tags=("v1",)))
    assert again == first
    assert (again.create_index, again.modify_index) == (2, 2)
    assert registry.index == 2
    assert await registry.instances() == ([first], 2)


async def test_reregistering_a_changed_definition_bumps_modify_index(
    registry: EmbeddedRegistry,
) -> None:
    await registry.register(web())
    await registry.register(web("db-1"))
    changed = await registry.register(web(port=8080))
    assert (changed.create_index, changed.modify_index, changed.port) == (2, 4, 8080)
    assert registry.index == 4
    assert await registry.get("web-1") == changed


async def test_index_only_grows(registry: EmbeddedRegistry) -> None:
    seen = [registry.index]
    seen.append((await registry.register(web("a"))).modify_index)
    seen.append((await registry.register(web("b"))).modify_index)
    seen.append(await registry.deregister("a"))
    seen.append((await registry.register(web("a"))).create_index)
    seen.append((await registry.register(web("b", port=81))).modify_index)
    seen.append(await registry.deregister("b"))
    seen.append(await registry.deregister("a"))
    assert seen == [1, 2, 3, 4, 5, 6, 7, 8]
    assert registry.index == 8
    assert await registry.instances() == ([], 8)


async def test_deregister_unknown_id_raises_naming_it(registry: EmbeddedRegistry) -> None:
    await registry.register(web())
    with pytest.raises(UnknownInstance) as caught:
        await registry.deregister("ghost-7")
    assert isinstance(caught.value, RegistryError)
    assert caught.value.instance_id == "ghost-7"
    assert str(caught.value) == (
        "Unknown service ID 'ghost-7': list registered ids with "
        "GET /v1/catalog/service/<name> or `consulate services`"
    )
    assert registry.index == 2
    assert ids((await registry.instances())[0]) == ["web-1"]


async def test_instances_filter_by_name_and_order_by_id(registry: EmbeddedRegistry) -> None:
    for instance_id in ["web-2", "web-10", "web-1"]:
        await registry.register(web(instance_id))
    for instance_id in ["db-b", "db-a"]:
        await registry.register(Instance(id=instance_id, name="db", address="10.0.0.9",
                                         port=5432))
    found, index = await registry.instances("web")
    assert ids(found) == ["web-1", "web-10", "web-2"]
    assert index == 6
    assert ids((await registry.instances("db"))[0]) == ["db-a", "db-b"]
    assert ids((await registry.instances())[0]) == ["db-a", "db-b", "web-1", "web-10",
                                                    "web-2"]
    assert await registry.instances("cache") == ([], 6)


# -- persistence ------------------------------------------------------------------


async def test_reopen_gives_the_same_instances_and_index(db_path: Path) -> None:
    reg = EmbeddedRegistry(db_path)
    reg.start()
    await reg.register(web("web-1", tags=("v1", "blue"), meta={"version": "2"}, node="n1"))
    await reg.register(web("web-2"))
    await reg.register(Instance(id="db-1", name="db", address="10.0.0.9", port=5432))
    await reg.register(web("web-2", port=81))
    await reg.deregister("db-1")
    before = await reg.instances()
    assert before[1] == 6
    await reg.close()

    reopened = EmbeddedRegistry(db_path)
    reopened.start()
    try:
        assert await reopened.instances() == before
        assert reopened.index == 6
        # The identical definition is still a no-op after the round trip...
        same = await reopened.register(web("web-1", tags=("v1", "blue"), meta={"version": "2"},
                                           node="n1"))
        assert (same.create_index, same.modify_index, reopened.index) == (2, 2, 6)
        # ...and the next change continues from the stored index.
        assert (await reopened.register(web("web-3"))).create_index == 7
        assert await reopened.deregister("web-2") == 8
    finally:
        await reopened.close()


async def test_weights_persist_and_rows_from_before_weights_still_open(db_path: Path) -> None:
    reg = EmbeddedRegistry(db_path)
    reg.start()
    await reg.register(web("web-1", weight=5, warning_weight=0))
    await reg.close()
    # A row as versions before weights wrote it: no weight fields in the JSON body.
    old_body = ('{"address": "10.0.0.5", "create_index": 9, "id": "old-1", "meta": {}, '
                '"modify_index": 9, "name": "web", "node": "n1", "port": 80, "tags": [], '
                '"ttl": null}')
    with contextlib.closing(sqlite3.connect(str(db_path))) as db:
        db.execute("INSERT INTO instances (id, body, expires_at) VALUES ('old-1', ?, NULL)",
                   (old_body,))
        db.commit()
    reopened = EmbeddedRegistry(db_path)
    try:
        found = {i.id: (i.weight, i.warning_weight) for i in (await reopened.instances())[0]}
        assert found == {"web-1": (5, 0), "old-1": (1, 1)}
    finally:
        await reopened.close()


async def test_reopen_of_a_live_ttl_instance_keeps_it(db_path: Path) -> None:
    """An instance with a TTL that has not run out survives a restart."""
    reg = EmbeddedRegistry(db_path)
    reg.start()
    stored = await reg.register(web(ttl=30.0))
    await reg.close()

    reopened = EmbeddedRegistry(db_path)
    reopened.start()
    try:
        assert await reopened.instances() == ([stored], 2)
        await reopened.heartbeat("web-1")
    finally:
        await reopened.close()


async def test_ttl_that_ran_out_while_closed_expires_after_start(db_path: Path) -> None:
    reg = EmbeddedRegistry(db_path)
    reg.start()
    await reg.register(web("web-1", ttl=0.1))
    await reg.register(web("web-2"))
    await reg.close()
    await asyncio.sleep(0.2)

    reopened = EmbeddedRegistry(db_path)
    reopened.start()
    try:
        assert await reopened.wait_for_index(3, timeout=STEP) == 4
        assert ids((await reopened.instances())[0]) == ["web-2"]
    finally:
        await reopened.close()
    assert rows_in_db(db_path) == ["web-2"]


# -- TTLs -------------------------------------------------------------------------


async def test_ttl_instance_expires_without_heartbeat(
    registry: EmbeddedRegistry, db_path: Path
) -> None:
    await registry.register(web("stays"))
    changes = registry.watch()
    async with contextlib.aclosing(changes):
        assert (await next_change(changes)).kind == "snapshot"
        started = time.monotonic()
        expiring = await registry.register(web("web-1", ttl=0.3))
        up = await next_change(changes)
        assert (up.index, up.kind, up.instances) == (3, "up", (expiring,))
        down = await next_change(changes)
        elapsed = time.monotonic() - started
    assert (down.index, down.kind, down.instances) == (4, "down", (expiring,))
    assert 0.25 <= elapsed < 3  # expired by the TTL, not before it
    assert ids((await registry.instances())[0]) == ["stays"]
    assert await registry.get("web-1") is None
    await registry.close()

    reopened = EmbeddedRegistry(db_path)
    try:
        assert ids((await reopened.instances())[0]) == ["stays"]
        assert reopened.index == 4
    finally:
        await reopened.close()


async def test_heartbeat_keeps_a_ttl_instance_alive(registry: EmbeddedRegistry) -> None:
    stored = await registry.register(web(ttl=0.2))
    for _ in range(4):  # 0.4 s: twice the original TTL
        await asyncio.sleep(0.1)
        await registry.heartbeat("web-1")
    assert await registry.instances() == ([stored], 2)
    # Stop heartbeating: it goes.
    assert await registry.wait_for_index(2, timeout=STEP) == 3
    assert await registry.instances() == ([], 3)


async def test_reregistering_the_same_ttl_instance_renews_it(registry: EmbeddedRegistry) -> None:
    await registry.register(web(ttl=0.2))
    for _ in range(3):  # 0.3 s: past the original TTL
        await asyncio.sleep(0.1)
        await registry.register(web(ttl=0.2))
    assert registry.index == 2
    assert ids((await registry.instances())[0]) == ["web-1"]


async def test_dropping_the_ttl_on_reregistration_stops_expiry(
    registry: EmbeddedRegistry,
) -> None:
    await registry.register(web(ttl=0.1))
    kept = await registry.register(web(ttl=None))
    assert await registry.wait_for_index(3, timeout=0.25) == 3
    assert await registry.instances() == ([kept], 3)


async def test_heartbeat_of_unknown_id_raises(registry: EmbeddedRegistry) -> None:
    with pytest.raises(UnknownInstance) as caught:
        await registry.heartbeat("ghost")
    assert caught.value.instance_id == "ghost"
    assert "'ghost'" in str(caught.value)


async def test_heartbeat_after_expiry_raises(registry: EmbeddedRegistry) -> None:
    await registry.register(web(ttl=0.1))
    assert await registry.wait_for_index(2, timeout=STEP) == 3
    with pytest.raises(UnknownInstance):
        await registry.heartbeat("web-1")


async def test_deregistered_ttl_instance_does_not_expire_again(
    registry: EmbeddedRegistry,
) -> None:
    await registry.register(web(ttl=0.1))
    assert await registry.deregister("web-1") == 3
    assert await registry.wait_for_index(3, timeout=0.25) == 3


@pytest.mark.parametrize(
    ("renew", "what"),
    [
        (lambda reg: reg.heartbeat("web-1"), "heartbeat()"),
        (lambda reg: reg.register(web(ttl=5.0)), "a TTL renewal"),  # identical: renews
    ],
)
async def test_close_right_after_a_renewal_returns(
    db_path: Path, renew: Callable[[EmbeddedRegistry], Awaitable[object]], what: str
) -> None:
    """An agent that heartbeats and then shuts down must not hang in close()."""
    reg = EmbeddedRegistry(db_path)
    reaper = start(reg)
    await reg.register(web(ttl=5.0))
    await asyncio.sleep(0.05)  # the reaper is now waiting for the next deadline
    await renew(reg)
    assert await close_within(reg, reaper, 0.3), f"close() hung after {what}"


async def test_close_of_an_idle_registry_returns(db_path: Path) -> None:
    reg = EmbeddedRegistry(db_path)
    reaper = start(reg)
    await reg.register(web(ttl=5.0))
    await asyncio.sleep(0.05)
    assert await close_within(reg, reaper, STEP)
    assert reaper.cancelled()


# -- watch ------------------------------------------------------------------------


async def test_watch_starts_with_a_snapshot_then_changes_in_order(
    registry: EmbeddedRegistry,
) -> None:
    a = await registry.register(web("a"))
    b = await registry.register(web("b"))
    changes = registry.watch()
    async with contextlib.aclosing(changes):
        snapshot = await next_change(changes)
        assert snapshot == Change(3, "snapshot", (a, b))
        c = await registry.register(web("c"))
        b2 = await registry.register(web("b", port=81))
        assert await registry.deregister("a") == 6
        got = [await next_change(changes) for _ in range(3)]
    assert got == [Change(4, "up", (c,)), Change(5, "up", (b2,)), Change(6, "down", (a,))]


async def test_watch_of_an_empty_registry(registry: EmbeddedRegistry) -> None:
    """The snapshot at index 1 is complete, so change 2 can be sent as 'up'."""
    changes = registry.watch()
    async with contextlib.aclosing(changes):
        assert await next_change(changes) == Change(1, "snapshot", ())
        a = await registry.register(web("a"))
        assert await next_change(changes) == Change(2, "up", (a,))


async def test_watch_since_replays_only_later_changes(registry: EmbeddedRegistry) -> None:
    await registry.register(web("a"))
    b = await registry.register(web("b"))
    await registry.deregister("a")
    changes = registry.watch(since=2)
    async with contextlib.aclosing(changes):
        first = await next_change(changes)
        second = await next_change(changes)
        d = await registry.register(web("d"))
        third = await next_change(changes)
    assert first == Change(3, "up", (b,))
    assert second.kind == "down" and second.index == 4 and ids(second.instances) == ["a"]
    assert third == Change(5, "up", (d,))


async def test_watch_since_the_current_index_waits_for_the_next_change(
    registry: EmbeddedRegistry,
) -> None:
    await registry.register(web("a"))
    changes = registry.watch(since=2)
    async with contextlib.aclosing(changes):
        pending = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(0.05)
        assert not pending.done()
        b = await registry.register(web("b"))
        assert await asyncio.wait_for(pending, STEP) == Change(3, "up", (b,))


async def test_watch_since_a_future_index_gets_a_snapshot(registry: EmbeddedRegistry) -> None:
    a = await registry.register(web("a"))
    changes = registry.watch(since=50)  # the consumer saw a registry that was reset
    async with contextlib.aclosing(changes):
        assert await next_change(changes) == Change(2, "snapshot", (a,))
        b = await registry.register(web("b"))
        assert await next_change(changes) == Change(3, "up", (b,))


async def test_watch_since_an_index_before_a_restart_gets_a_snapshot(db_path: Path) -> None:
    reg = EmbeddedRegistry(db_path)
    await reg.register(web("a"))
    b = await reg.register(web("b"))
    await reg.close()
    reopened = EmbeddedRegistry(db_path)
    reopened.start()
    try:
        changes = reopened.watch(since=2)  # change 3 is not in the new process's log
        async with contextlib.aclosing(changes):
            snapshot = await next_change(changes)
        assert snapshot.kind == "snapshot"
        assert snapshot.index == 3
        assert ids(snapshot.instances) == ["a", "b"]
        assert snapshot.instances[1] == b
    finally:
        await reopened.close()


async def test_watch_since_a_compacted_index_gets_a_snapshot(registry: EmbeddedRegistry) -> None:
    for port in range(1, CHANGE_LOG_LENGTH + 3):
        await registry.register(web("a", port=port))
    last = registry.index
    assert last == CHANGE_LOG_LENGTH + 3
    changes = registry.watch(since=2)
    async with contextlib.aclosing(changes):
        snapshot = await next_change(changes)
    assert snapshot.kind == "snapshot"
    assert snapshot.index == last
    assert [i.port for i in snapshot.instances] == [CHANGE_LOG_LENGTH + 2]


async def test_two_watchers_see_the_same_changes(registry: EmbeddedRegistry) -> None:
    base = await registry.register(web("base"))
    first, second = registry.watch(), registry.watch()
    async with contextlib.aclosing(first), contextlib.aclosing(second):
        assert await next_change(first) == Change(2, "snapshot", (base,))
        assert await next_change(second) == Change(2, "snapshot", (base,))
        a = await registry.register(web("a"))
        await registry.deregister("a")
        expected = [Change(3, "up", (a,)), Change(4, "down", (a,))]
        assert [await next_change(first) for _ in range(2)] == expected
        assert [await next_change(second) for _ in range(2)] == expected


# -- wait_for_index ---------------------------------------------------------------


async def test_wait_for_index_returns_at_once_when_already_passed(
    registry: EmbeddedRegistry,
) -> None:
    await registry.register(web("a"))
    await registry.register(web("b"))
    started = time.monotonic()
    assert await registry.wait_for_index(2, timeout=5.0) == 3
    assert await registry.wait_for_index(0, timeout=5.0) == 3
    assert time.monotonic() - started < 0.1


async def test_wait_for_index_returns_after_a_registration(registry: EmbeddedRegistry) -> None:
    await registry.register(web("a"))
    waiter = asyncio.ensure_future(registry.wait_for_index(2, timeout=5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    started = time.monotonic()
    await registry.register(web("b"))
    assert await asyncio.wait_for(waiter, STEP) == 3
    assert time.monotonic() - started < 0.1


async def test_wait_for_index_times_out_with_the_unchanged_index(
    registry: EmbeddedRegistry,
) -> None:
    await registry.register(web("a"))
    started = time.monotonic()
    assert await registry.wait_for_index(2, timeout=0.1) == 2
    elapsed = time.monotonic() - started
    assert 0.09 <= elapsed < 3
    # The registry still works after a timed-out wait (the condition's lock was released).
    waiter = asyncio.ensure_future(registry.wait_for_index(2, timeout=5.0))
    await asyncio.sleep(0.01)
    await registry.register(web("b"))
    assert await asyncio.wait_for(waiter, STEP) == 3


async def test_many_concurrent_waiters_all_wake(registry: EmbeddedRegistry) -> None:
    waiters = [asyncio.ensure_future(registry.wait_for_index(1, timeout=5.0))
               for _ in range(20)]
    await asyncio.sleep(0.02)
    assert not any(w.done() for w in waiters)
    await registry.register(web("a"))
    assert await asyncio.wait_for(asyncio.gather(*waiters), STEP) == [2] * 20
