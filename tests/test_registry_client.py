"""The registry's Python client against a real Discoverd API server on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from consulate.control import discover_api
from consulate.control.registry import EmbeddedRegistry
from consulate.control.registry import client as client_module
from consulate.control.registry.client import (
    RegistryClient,
    RegistryClientError,
    RoundRobin,
    pick_random,
)
from consulate.control.registry.hub import WatchHub

ADDRESS = "127.43.0.1"


@dataclass
class Server:
    registry: EmbeddedRegistry
    hub: WatchHub
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://{ADDRESS}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.hub.close()
        await self.registry.close()


async def serve(path: Path, port: int = 0) -> Server:
    registry = EmbeddedRegistry(path)
    registry.start()
    hub = WatchHub(registry)
    await hub.start()
    app = web.Application()
    discover_api.add_routes(app, registry, hub, node="n1")
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, ADDRESS, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    return Server(registry, hub, runner, bound)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    running = await serve(tmp_path / "registry.db")
    yield running
    await running.stop()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[RegistryClient]:
    running = RegistryClient(server.url)
    yield running
    await running.close()


async def test_heartbeats_keep_an_instance_alive_and_close_removes_it(
    client: RegistryClient,
) -> None:
    registration = await client.register("web", "10.0.0.1:80", meta={"v": "1"}, ttl=1.0)
    await asyncio.sleep(2.5)  # more than two TTLs
    [live] = await client.instances("web")
    assert (live.id, live.addr, live.meta) == (registration.id, "10.0.0.1:80", {"v": "1"})
    await registration.close()
    assert await client.instances("web") == []


async def test_closing_the_client_stops_what_it_started(server: Server) -> None:
    """A registration and a service set left open when the client closes: their tasks
    end with it (no heartbeat from a closed client), and the instance, not
    deregistered, expires after its TTL."""
    client = RegistryClient(server.url)
    before = asyncio.all_tasks()
    await client.register("web", "10.0.0.1:80", ttl=1.0)
    web_set = await client.service_set("web")
    assert [i.addr for i in web_set.instances] == ["10.0.0.1:80"]
    await client.close()
    left = [t for t in asyncio.all_tasks() - before
            if t.get_coro().cr_code.co_filename == client_module.__file__]  # type: ignore[union-attr]
    assert left == []
    instances, _ = await server.registry.instances("web")
    assert [i.address for i in instances] == ["10.0.0.1"]  # still there: not deregistered
    for _ in range(50):
        instances, _ = await server.registry.instances("web")
        if not instances:
            break
        await asyncio.sleep(0.1)
    assert instances == []
    with pytest.raises(RegistryClientError, match="is closed"):
        await client.instances("web")


async def test_a_killed_client_expires_and_the_leader_moves(
    server: Server, client: RegistryClient
) -> None:
    script = (
        "import asyncio\n"
        "from consulate.control.registry.client import RegistryClient\n"
        "async def main():\n"
        f"    c = RegistryClient({server.url!r})\n"
        "    await c.register('jobs', '10.0.0.1:90', ttl=1.0, instance_id='first')\n"
        "    print('registered', flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n")
    # A separate process, killed with SIGKILL: it never deregisters.
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", script,
                                                 stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 10) == b"registered\n"
        second = await client.register("jobs", "10.0.0.2:90", ttl=1.0, instance_id="second")
        jobs = await client.service_set("jobs")
        assert [i.id for i in jobs.instances] == ["first", "second"]
        assert jobs.leader is not None and jobs.leader.id == "first"
        os.kill(child.pid, signal.SIGKILL)
        await jobs.wait_for(lambda s: [i.id for i in s.instances] == ["second"], timeout=5)
        await jobs.wait_for(lambda s: s.leader is not None and s.leader.id == "second", 2)
        await jobs.close()
        await second.close()
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()


async def test_register_and_standby_returns_once_leader(client: RegistryClient) -> None:
    first = await client.register("jobs", "10.0.0.1:90")
    standby = asyncio.ensure_future(client.register_and_standby("jobs", "10.0.0.2:90"))
    await asyncio.sleep(0.3)
    assert not standby.done()
    await first.close()
    second = await asyncio.wait_for(standby, 5)
    assert [i.id for i in await client.instances("jobs")] == [second.id]
    await second.close()


async def test_service_set_select_filter_and_balancers(client: RegistryClient) -> None:
    regs = [await client.register("web", f"10.0.0.{n}:80", meta={"zone": "ab"[n % 2]})
            for n in range(1, 4)]
    web_set = await client.service_set("web")
    assert [i.addr for i in web_set.select(zone="b")] == ["10.0.0.1:80", "10.0.0.3:80"]
    assert [i.addr for i in web_set.filter(lambda i: i.addr.endswith("2:80"))] == ["10.0.0.2:80"]
    turns = RoundRobin()
    assert [turns.pick(web_set.instances).addr for _ in range(4)] == [
        "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.1:80"]
    assert pick_random(web_set.instances) in web_set.instances
    with pytest.raises(RegistryClientError, match="no live instance"):
        pick_random([])
    await web_set.close()
    for registration in regs:
        await registration.close()


async def test_dial_connects_to_a_live_instance_and_skips_dead_ones(
    client: RegistryClient,
) -> None:
    async def greet(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\n")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(greet, ADDRESS, 0)
    port = listener.sockets[0].getsockname()[1]
    dead = await client.register("echo", f"{ADDRESS}:1")  # nothing listens on port 1
    live = await client.register("echo", f"{ADDRESS}:{port}")
    for _ in range(3):  # whichever it tries first, it ends on the live one
        reader, writer = await client.dial("echo")
        assert await reader.readline() == b"hello\n"
        writer.close()
    await live.close()
    with pytest.raises(RegistryClientError, match=r"no live instance of 'echo' accepted"):
        await client.dial("echo")
    await dead.close()
    listener.close()


async def test_streams_reconnect_and_rebuild_the_set(tmp_path: Path) -> None:
    server = await serve(tmp_path / "registry.db")
    client = RegistryClient(server.url)
    try:
        stay = await client.register("web", "10.0.0.1:80", ttl=30)
        leave = await client.register("web", "10.0.0.2:80", ttl=30)
        web_set = await client.service_set("web")
        assert len(web_set.instances) == 2
        await server.stop()
        assert await asyncio.wait_for(client.connection_events.get(), 5) == "disconnected"
        # While the client is away the instance leaves (the same registry file).
        server = await serve(tmp_path / "registry.db", server.port)
        await server.registry.deregister(leave.id)
        assert await asyncio.wait_for(client.connection_events.get(), 10) == "reconnected"
        await web_set.wait_for(lambda s: [i.id for i in s.instances] == [stay.id], 5)
        await web_set.close()
        await stay.close()
    finally:
        await client.close()
        await server.stop()


async def test_an_agent_that_is_down_is_a_clear_error() -> None:
    client = RegistryClient(f"http://{ADDRESS}:1")
    with pytest.raises(RegistryClientError, match=rf"agent at http://{ADDRESS}:1 cannot be"):
        await client.register("web", "10.0.0.1:80")
    await client.close()


async def test_a_service_set_that_times_out_leaves_no_task_behind() -> None:
    client = RegistryClient(f"http://{ADDRESS}:1")  # no agent: the set never fills
    before = len(asyncio.all_tasks())
    with pytest.raises(TimeoutError):
        await client.service_set("web", timeout=0.3)
    assert len(asyncio.all_tasks()) == before
    await client.close()


async def test_a_refused_registration_says_why(client: RegistryClient) -> None:
    with pytest.raises(RegistryClientError, match=r"400 addr '10\.0\.0\.1' must be IP:PORT"):
        await client.register("web", "10.0.0.1")
