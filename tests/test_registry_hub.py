"""The watch hub over a real (embedded) registry: per-service wakeups and streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from consulate.control.registry import EmbeddedRegistry, Instance
from consulate.control.registry import hub as hubmod
from consulate.control.registry.events import ServiceEvent
from consulate.control.registry.hub import WatchHub


@pytest.fixture
async def hub(registry: EmbeddedRegistry) -> AsyncIterator[WatchHub]:
    running = WatchHub(registry)
    await running.start()
    yield running
    await running.close()


def inst(service: str, n: int, port: int = 80) -> Instance:
    return Instance(id=f"{service}-{n}", name=service, address=f"10.0.0.{n}", port=port)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_write_wakes_only_the_watchers_of_its_service(
    registry: EmbeddedRegistry, hub: WatchHub
) -> None:
    index = hub.service_index("web")
    web_waiters = [asyncio.ensure_future(hub.wait("web", index, 10)) for _ in range(1000)]
    db_waiters = [asyncio.ensure_future(hub.wait("db", index, 10)) for _ in range(1000)]
    await settle()
    assert hub.stats() == {"services": 2, "waiters": 2000, "streams": 0}
    stored = await registry.register(inst("web", 1))
    await settle()
    assert all(w.done() for w in web_waiters)
    assert {w.result() for w in web_waiters} == {stored.modify_index}
    assert not any(w.done() for w in db_waiters)
    for waiter in db_waiters:
        waiter.cancel()
    await asyncio.gather(*db_waiters, return_exceptions=True)
    assert hub.stats() == {"services": 0, "waiters": 0, "streams": 0}  # nothing kept


async def test_a_heartbeat_wakes_nobody(registry: EmbeddedRegistry, hub: WatchHub) -> None:
    await registry.register(inst("web", 1))
    await settle()
    index = hub.service_index("web")
    waiter = asyncio.ensure_future(hub.wait("web", index, 0.3))
    await registry.register(inst("web", 1))  # the same registration again
    assert await waiter == index  # timed out: nothing changed


async def test_wait_returns_at_once_when_the_service_is_already_past(
    registry: EmbeddedRegistry, hub: WatchHub
) -> None:
    stored = await registry.register(inst("web", 1))
    await settle()
    assert await hub.wait("web", stored.modify_index - 1, 10) == stored.modify_index


async def test_a_subscription_streams_set_current_leader_then_changes(
    registry: EmbeddedRegistry, hub: WatchHub
) -> None:
    await registry.register(inst("web", 1))
    await settle()
    stream = hub.subscribe("web")
    got: list[ServiceEvent] = [await anext(stream) for _ in range(3)]
    assert [(e.kind, e.instance and e.instance.id) for e in got] == [
        ("up", "web-1"), ("current", None), ("leader", "web-1")]
    await registry.register(inst("web", 2))
    await registry.register(inst("web", 2, port=81))
    await registry.deregister("web-1")
    got = [await asyncio.wait_for(anext(stream), 2) for _ in range(4)]
    assert [(e.kind, e.instance and e.instance.id) for e in got] == [
        ("up", "web-2"), ("update", "web-2"), ("down", "web-1"), ("leader", "web-2")]
    await stream.aclose()  # type: ignore[attr-defined]
    assert hub.stats()["streams"] == 0


async def test_a_subscriber_that_falls_behind_is_ended(
    registry: EmbeddedRegistry, hub: WatchHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hubmod, "SUBSCRIBER_QUEUE", 4)
    stream = hub.subscribe("web")
    assert (await anext(stream)).kind == "current"  # an empty service: no instance yet
    for n in range(10):
        await registry.register(inst("web", n))
    await settle()
    drained = [event async for event in stream]  # ends instead of growing without bound
    assert len(drained) < 4
    assert hub.stats()["streams"] == 0
