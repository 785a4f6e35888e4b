"""The agent's own registrations (control/local_services.py): liveness by heartbeat,
re-registration after an expiry, no resurrection of a deliberate deregistration,
the copy kept on disk; against the real embedded registry (and a Consul API that
is not there, for the outage)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from apiclient import Api, make_context

from consulate.control.http_api import build_app
from consulate.control.local_services import LocalServices
from consulate.control.registry import EmbeddedRegistry, Instance
from consulate.control.registry.consul_agent import ConsulRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


WEB = Instance(id="web-1", name="web", address="10.0.0.5", port=80, node="h1")


async def test_owned_instances_carry_the_agent_ttl_and_heartbeats_renew_them(
        tmp_path: Path) -> None:
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    local = LocalServices(registry, tmp_path / "services.json", ttl=10.0)
    assert local.owned(WEB).ttl == 10.0
    assert local.owned(Instance(id="x", name="x", address="10.0.0.1", port=1, ttl=3.0)).ttl == 3.0
    stored = await registry.register(local.owned(WEB))
    local.added(stored, local.now())
    index = registry.index
    await local.sync()
    assert registry.index == index  # a heartbeat is no write
    assert json.loads((tmp_path / "services.json").read_text())[0]["id"] == "web-1"
    await registry.close()


async def test_an_expired_instance_is_registered_again(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    local = LocalServices(registry, tmp_path / "services.json", ttl=10.0, clock=clock)
    local.added(await registry.register(local.owned(WEB)), local.now())
    await registry.deregister("web-1")  # what the reaper does once the TTL ran out
    clock.now += 10.0  # ... which needs a TTL without heartbeats
    with caplog.at_level(logging.INFO, "consulate.local"):
        await local.sync()
    assert [i.id for i in (await registry.instances())[0]] == ["web-1"]
    assert "event=re-register id=web-1 service=web" in caplog.text
    await registry.close()


async def test_a_deregistration_elsewhere_is_not_undone(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    local = LocalServices(registry, tmp_path / "services.json", ttl=10.0, clock=clock)
    local.added(await registry.register(local.owned(WEB)), local.now())
    clock.now += 2.0
    await registry.deregister("web-1")  # through another agent: the lease was running
    with caplog.at_level(logging.INFO, "consulate.local"):
        await local.sync()
    assert (await registry.instances())[0] == []
    assert len(local) == 0
    assert json.loads((tmp_path / "services.json").read_text()) == []
    assert "event=forget id=web-1 service=web" in caplog.text
    await registry.close()


class Restartable:
    """A registry that can come back empty, as an etcd whose data was lost."""

    def __init__(self, registry: EmbeddedRegistry) -> None:
        self.current = registry

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current, name)


async def test_a_registry_back_without_its_data_gets_the_registration_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Lost while its lease was running, but the registry's index went back below the
    registration's: nobody deregistered it, the registry lost it (regression: it was
    forgotten as "deregistered elsewhere" when etcd came back empty within a TTL)."""
    clock = Clock()
    old = EmbeddedRegistry(tmp_path / "old.db")
    for i in range(3):
        await old.register(Instance(id=f"db-{i}", name="db", address="10.0.0.6", port=i + 1))
    registry = Restartable(old)
    local = LocalServices(registry, tmp_path / "services.json", ttl=10.0,  # type: ignore[arg-type]
                          clock=clock)
    local.added(await registry.register(local.owned(WEB)), local.now())
    clock.now += 2.0  # the lease is still running
    registry.current = EmbeddedRegistry(tmp_path / "new.db")
    with caplog.at_level(logging.INFO, "consulate.local"):
        await local.sync()
    assert [i.id for i in (await registry.current.instances())[0]] == ["web-1"]
    assert len(local) == 1
    assert ("event=re-register id=web-1 service=web reason='the registry lost its data (its "
            "index went back from 5 to 1)'") in caplog.text
    await old.close()
    await registry.current.close()


async def test_a_slow_heartbeat_counts_from_when_it_was_sent(tmp_path: Path) -> None:
    """A renewal whose answer came late must not make a lease that ran out since it
    was sent look fresh: the instance is registered again, not forgotten."""
    clock = Clock()
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    local = LocalServices(registry, tmp_path / "services.json", ttl=10.0, clock=clock)
    local.added(await registry.register(local.owned(WEB)), local.now())
    renew = registry.heartbeat

    async def slow_heartbeat(instance_id: str) -> None:
        await renew(instance_id)
        clock.now += 4.0  # the answer took 4 s (a busy registry)

    registry.heartbeat = slow_heartbeat  # type: ignore[method-assign]
    await local.sync()
    await registry.deregister("web-1")  # as the reaper would, 10 s after the renewal
    clock.now += 2.0  # 6 s after the renewal was sent, 2 s after its answer
    await local.sync()
    assert [i.id for i in (await registry.instances())[0]] == ["web-1"]
    await registry.close()


async def test_a_restarted_agent_restores_what_it_registered(tmp_path: Path) -> None:
    first = EmbeddedRegistry(tmp_path / "a.db")
    local = LocalServices(first, tmp_path / "services.json")
    local.added(await first.register(local.owned(WEB)), local.now())
    await first.close()
    fresh = EmbeddedRegistry(tmp_path / "b.db")  # the registry lost everything meanwhile
    restarted = LocalServices(fresh, tmp_path / "services.json")
    await restarted.sync()
    [instance], _ = await fresh.instances()
    assert instance.indexed(0, 0) == local.owned(WEB)
    await fresh.close()


async def test_an_unreadable_copy_is_reported_and_skipped(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "services.json").write_text("{not json")
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    with caplog.at_level(logging.WARNING, "consulate.local"):
        local = LocalServices(registry, tmp_path / "services.json")
    assert len(local) == 0
    assert "event=local-services-unreadable" in caplog.text
    await registry.close()


async def test_a_registry_outage_is_logged_once_and_survived(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # No Consul server runs here: port 1 on loopback refuses, as a registry that is down.
    registry = ConsulRegistry("127.0.0.1", 1)
    local = LocalServices(registry, tmp_path / "services.json")
    local.added(local.owned(WEB), local.now())
    with caplog.at_level(logging.INFO, "consulate.local"):
        await local.sync()
        await local.sync()
    assert caplog.text.count("event=heartbeat-failed") == 1
    assert "consul agent at 127.0.0.1:1 is not answering" in caplog.text
    assert len(local) == 1  # nothing lost: it is registered again once the registry is back
    await registry.close()


async def test_the_api_registers_owned_instances_and_forgets_deregistered_ones(
        tmp_path: Path) -> None:
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    context = make_context(registry)
    context.local = LocalServices(registry, tmp_path / "services.json", ttl=7.0)
    async with TestClient(TestServer(build_app(context))) as client:
        api = Api(client, registry)
        assert await api.put("/v1/agent/service/register",
                             {"ID": "web-1", "Name": "web", "Port": 80}) == (200, "")
        assert (await registry.get("web-1")).ttl == 7.0  # type: ignore[union-attr]
        assert len(context.local) == 1
        assert await api.put("/v1/agent/service/deregister/web-1") == (200, "")
        assert len(context.local) == 0
    await registry.close()


async def test_a_registration_while_the_registry_is_down_is_kept_and_synced_later(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As a Consul agent with no server answering: the registration is accepted, kept
    (services.json), and registered by the first heartbeat round that gets through."""
    down = ConsulRegistry("127.0.0.1", 1)  # no Consul server here: port 1 refuses
    registry = Restartable(down)  # type: ignore[arg-type]
    context = make_context(registry)  # type: ignore[arg-type]
    context.local = LocalServices(registry, tmp_path / "services.json",  # type: ignore[arg-type]
                                  ttl=7.0)
    with caplog.at_level(logging.INFO):
        async with TestClient(TestServer(build_app(context))) as client:
            response = await client.put("/v1/agent/service/register",
                                        json={"ID": "web-1", "Name": "web", "Port": 80})
            assert (response.status, await response.text()) == (200, "")
        assert [entry["id"] for entry in json.loads(
            (tmp_path / "services.json").read_text())] == ["web-1"]
        assert ("event=register-deferred id=web-1 service=web error=consul agent at "
                "127.0.0.1:1 is not answering") in caplog.text
        await context.local.sync()  # still down: kept
        assert len(context.local) == 1
        registry.current = EmbeddedRegistry(tmp_path / "registry.db")
        await context.local.sync()
    stored = await registry.current.get("web-1")
    assert stored is not None and (stored.name, stored.port, stored.ttl) == ("web", 80, 7.0)
    assert ("event=re-register id=web-1 service=web reason='registered through this agent "
            "while the registry was unavailable'") in caplog.text
    await down.close()
    await registry.current.close()
