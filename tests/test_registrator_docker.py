"""The registrator against a real dockerd (in a lab host) and consulate's Consul API.

services.md's examples run as written (the image is busybox tagged with the
examples' names), then each flag, the die/stop paths, registry outages, -cleanup,
and the restart cases: a registrator killed with SIGKILL while containers come and
go, and a dockerd restart; afterwards the registry must equal the running
containers, no ghost and none missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from registrator_support import Facade, facade, until

from consulate.control import lab as labmod
from consulate.control.labdocker import LabDocker, busybox_image_tar
from consulate.control.registrator import flags
from consulate.control.registrator.adapters import open_adapter
from consulate.control.registrator.docker_source import DockerSource
from consulate.control.registrator.runner import run
from consulate.control.registry import Instance

pytestmark = pytest.mark.lab

HOST = "testhost"
IP = "10.99.0.11"  # -ip: the lab host's address
SLEEP = ["sleep", "600"]


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabDocker]:
    with labmod.up(hosts=1, containers=0) as lab:
        daemon = LabDocker(lab, 1, tmp_path_factory.mktemp("dockerd")).start()
        try:
            daemon.import_image(busybox_image_tar(), "progrium/redis", "progrium/nginx",
                                "dockerfile/redis")
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture
def docker(dockerd: LabDocker) -> Iterator[LabDocker]:
    """The daemon, with no container left over by the test."""
    yield dockerd
    dockerd.remove_all()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Facade]:
    async with facade(tmp_path / "store") as running:
        yield running


@contextlib.asynccontextmanager
async def registrator(docker: LabDocker, uri: str, *argv: str) -> AsyncIterator[None]:
    """``consulate registrator ARGV URI`` in this process, as HOST."""
    options = flags.parse([*argv, uri])
    options.validate()
    stop = asyncio.Event()
    task = asyncio.create_task(run(options, hostname=HOST, docker=DockerSource(docker.url),
                                   adapter=open_adapter(uri, HOST), stop=stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def drun(docker: LabDocker, name: str, command: list[str] = SLEEP,
               **kwargs: Any) -> str:
    return await asyncio.to_thread(docker.run, name, command, **kwargs)


async def catalog(store: Facade) -> dict[str, tuple[Any, ...]]:
    instances, _ = await store.registry.instances()
    return {i.id: (i.name, i.address, i.port, i.tags, i.meta) for i in instances}


async def registered(store: Facade, expected: dict[str, tuple[Any, ...]]) -> None:
    async def same() -> bool:
        return await catalog(store) == expected
    await until(same, what=f"registry == {expected}")
    await asyncio.sleep(0.2)  # and nothing more arrives
    assert await catalog(store) == expected


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "consulate.registrator"]


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="consulate.registrator")


# -- services.md's examples --------------------------------------------------------


async def test_single_service_with_defaults(docker: LabDocker, store: Facade,
                                            caplog: pytest.LogCaptureFixture) -> None:
    async with registrator(docker, f"consul://{store.address}", "-ip", IP):
        cid = await drun(docker, "redis.0", image="progrium/redis",
                         publish={"6379/tcp": 10000})
        await registered(store, {f"{HOST}:redis.0:6379": ("redis", IP, 10000, (), {})})
    assert f"added: {cid[:12]} {HOST}:redis.0:6379" in lines(caplog)


@pytest.mark.parametrize(("image", "via"), [("progrium/redis", "env"),
                                             ("dockerfile/redis", "labels")])
async def test_single_service_with_metadata(docker: LabDocker, store: Facade, image: str,
                                            via: str) -> None:
    """services.md's "with metadata" and "using labels to define metadata"."""
    metadata = {"SERVICE_NAME": "db", "SERVICE_TAGS": "master,backups",
                "SERVICE_REGION": "us2"}
    async with registrator(docker, f"consul://{store.address}", "-ip", IP):
        await drun(docker, "redis.0", image=image, publish={"6379/tcp": 10000},
                   **{via: metadata})
        await registered(store, {f"{HOST}:redis.0:6379": (
            "db", IP, 10000, ("master", "backups"), {"region": "us2"})})


async def test_multiple_services_with_defaults(docker: LabDocker, store: Facade) -> None:
    async with registrator(docker, f"consul://{store.address}", "-ip", IP):
        await drun(docker, "nginx.0", image="progrium/nginx",
                   publish={"443/tcp": 4443, "80/tcp": 8000})
        await registered(store, {f"{HOST}:nginx.0:443": ("nginx-443", IP, 4443, (), {}),
                                 f"{HOST}:nginx.0:80": ("nginx-80", IP, 8000, (), {})})


async def test_multiple_services_with_metadata(docker: LabDocker, store: Facade) -> None:
    async with registrator(docker, f"consul://{store.address}", "-ip", IP):
        await drun(docker, "nginx.0", image="progrium/nginx",
                   publish={"443/tcp": 4443, "80/tcp": 8000},
                   env={"SERVICE_443_NAME": "https", "SERVICE_443_ID": "https.12345",
                        "SERVICE_443_SNI": "enabled", "SERVICE_80_NAME": "http",
                        "SERVICE_TAGS": "www"})
        await registered(store, {"https.12345": ("https", IP, 4443, ("www",), {"sni": "enabled"}),
                                 f"{HOST}:nginx.0:80": ("http", IP, 8000, ("www",), {})})


# -- the other rules, each in dockerd ---------------------------------------------------


async def test_udp_port(docker: LabDocker, store: Facade) -> None:
    async with registrator(docker, f"consul://{store.address}", "-ip", IP):
        await drun(docker, "dns.0", publish={"53/udp": 5353, "53/tcp": 5353},
                   env={"SERVICE_NAME": "dns", "SERVICE_53_NAME": "dns"})
        await registered(store, {f"{HOST}:dns.0:53": ("dns", IP, 5353, (), {}),
                                 f"{HOST}:dns.0:53:udp": ("dns", IP, 5353, ("udp",), {})})


async def test_ignored_ports_and_containers(docker: LabDocker, store: Facade,
                                            caplog: pytest.LogCaptureFixture) -> None:
    async with registrator(docker, f"consul://{store.address}", "-ip", IP):
        web = await drun(docker, "web.0", publish={"80/tcp": 8000, "443/tcp": 4443},
                         expose=["53/udp"], env={"SERVICE_443_IGNORE": "true"})
        hidden = await drun(docker, "hidden.0", publish={"80/tcp": 8001},
                            labels={"SERVICE_IGNORE": "yes"})
        bare = await drun(docker, "bare.0")
        await registered(store, {f"{HOST}:web.0:80": ("busybox-80", IP, 8000, (), {})})
    logged = lines(caplog)
    for line in (f"ignored: {web[:12]} port 53 not published on host",
                 f"ignored: {web[:12]} service on port 443",
                 f"ignored: {hidden[:12]} service on port 80",
                 f"ignored: {bare[:12]} no published ports"):
        assert line in logged


async def test_explicit_mode(docker: LabDocker, store: Facade) -> None:
    async with registrator(docker, f"consul://{store.address}", "-ip", IP, "-explicit"):
        await drun(docker, "anon.0", publish={"80/tcp": 8000})
        await drun(docker, "named.0", publish={"80/tcp": 8001}, env={"SERVICE_NAME": "web"})
        await registered(store, {f"{HOST}:named.0:80": ("web", IP, 8001, (), {})})


async def test_internal_mode(docker: LabDocker, store: Facade) -> None:
    async with registrator(docker, f"consul://{store.address}", "-internal"):
        cid = await drun(docker, "web.0", publish={"80/tcp": 8000}, expose=["9000/tcp"],
                         env={"SERVICE_NAME": "web"})
        inside = docker.api.inspect_container(cid)["NetworkSettings"]["IPAddress"]
        assert inside.startswith("172.17.")
        await registered(store, {f"{HOST}:web.0:80": ("web-80", inside, 80, (), {}),
                                 f"{HOST}:web.0:9000": ("web-9000", inside, 9000, (), {})})


async def test_forced_tags(docker: LabDocker, store: Facade) -> None:
    async with registrator(docker, f"consul://{store.address}", "-ip", IP,
                           "-tags", "prod,rack\\,7"):
        await drun(docker, "web.0", publish={"80/tcp": 8000},
                   env={"SERVICE_NAME": "web", "SERVICE_TAGS": "v2"})
        await registered(store, {f"{HOST}:web.0:80": ("web", IP, 8000,
                                                      ("v2", "prod", "rack,7"), {})})


async def test_ttl_refresh_keeps_consulate_registrations_alive(
        docker: LabDocker, store: Facade, caplog: pytest.LogCaptureFixture) -> None:
    async with registrator(docker, f"consulate://{store.address}", "-ip", IP,
                           "-ttl", "2", "-ttl-refresh", "1"):
        cid = await drun(docker, "web.0", publish={"80/tcp": 8000})
        expected = {f"{HOST}:web.0:80": ("busybox", IP, 8000, (), {})}
        await registered(store, expected)
        await asyncio.sleep(3)  # longer than the TTL: only the refreshes keep it
        assert await catalog(store) == expected
        [instance], _ = await store.registry.instances()
        assert [(c.id, c.kind, c.ttl, c.status) for c in instance.checks] == [
            (f"liveness:{HOST}:web.0:80", "ttl", 2.0, "passing")]
    assert f"refreshed: {cid[:12]} {HOST}:web.0:80" in lines(caplog)


# -- leaving ---------------------------------------------------------------------------


async def test_a_stopped_container_leaves(docker: LabDocker, store: Facade,
                                          caplog: pytest.LogCaptureFixture) -> None:
    async with registrator(docker, f"consul://{store.address}", "-ip", IP):
        cid = await drun(docker, "web.0", publish={"80/tcp": 8000})
        await registered(store, {f"{HOST}:web.0:80": ("busybox", IP, 8000, (), {})})
        await asyncio.to_thread(docker.api.kill, cid)
        await registered(store, {})
    assert f"removed: {cid[:12]} {HOST}:web.0:80" in lines(caplog)


async def test_deregister_on_success_keeps_failed_containers(docker: LabDocker,
                                                             store: Facade) -> None:
    async with registrator(docker, f"consul://{store.address}", "-ip", IP,
                           "-deregister", "on-success"):
        ok = await drun(docker, "ok.0", ["sh", "-c", "sleep 1; exit 0"], publish={"80/tcp": 8000})
        bad = await drun(docker, "bad.0", ["sh", "-c", "sleep 1; exit 3"],
                         publish={"80/tcp": 8001})
        await until(lambda: not docker.api.containers(quiet=True), what="both exited")
        await registered(store, {f"{HOST}:bad.0:80": ("busybox", IP, 8001, (), {})})
        await asyncio.to_thread(docker.api.remove_container, bad)  # destroy: now it goes
        await registered(store, {})
        assert ok


async def test_running_containers_are_synced_at_start(docker: LabDocker, store: Facade,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    await drun(docker, "a.0", publish={"80/tcp": 8000})
    await drun(docker, "b.0", publish={"80/tcp": 8001})
    async with registrator(docker, f"consul://{store.address}", "-ip", IP):
        await registered(store, {f"{HOST}:a.0:80": ("busybox", IP, 8000, (), {}),
                                 f"{HOST}:b.0:80": ("busybox", IP, 8001, (), {})})
    assert "Syncing services on 2 containers" in lines(caplog)


async def test_cleanup_removes_this_hosts_dangling_registrations(
        docker: LabDocker, store: Facade, caplog: pytest.LogCaptureFixture) -> None:
    for service_id in (f"{HOST}:gone.0:80", "otherhost:x.0:80", "custom-id"):
        await store.registry.register(Instance(id=service_id, name="x", address=IP, port=1,
                                               node="n1"))
    await drun(docker, "a.0", publish={"80/tcp": 8000})
    async with registrator(docker, f"consul://{store.address}", "-ip", IP, "-cleanup"):
        await registered(store, {f"{HOST}:a.0:80": ("busybox", IP, 8000, (), {}),
                                 "otherhost:x.0:80": ("x", IP, 1, (), {}),
                                 "custom-id": ("x", IP, 1, (), {})})
    assert f"dangling: {HOST}:gone.0:80" in lines(caplog)


async def test_registry_outage_loses_nothing(docker: LabDocker, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Registrations and removals refused while the store is down land at a resync."""
    async with contextlib.AsyncExitStack() as outage:
        first = await outage.enter_async_context(facade(tmp_path / "store"))
        async with registrator(docker, f"consul://{first.address}", "-ip", IP, "-resync", "1"):
            gone = await drun(docker, "gone.0", publish={"80/tcp": 8000})
            await registered(first, {f"{HOST}:gone.0:80": ("busybox", IP, 8000, (), {})})
            await outage.aclose()  # the store goes away: its port is closed
            await asyncio.to_thread(docker.api.kill, gone)
            new = await drun(docker, "new.0", publish={"80/tcp": 8001})
            await until(lambda: {line.split(":")[0] for line in lines(caplog)}
                        >= {"register failed", "deregister failed"}, what="both refused")
            async with facade(tmp_path / "store", first.port) as back:  # the same store
                await registered(back, {f"{HOST}:new.0:80": ("busybox", IP, 8001, (), {})})
    logged = lines(caplog)
    assert f"added: {new[:12]} {HOST}:new.0:80" in logged
    assert f"removed: {gone[:12]} {HOST}:gone.0:80" in logged


# -- restarts: the registry equals the running containers afterwards ----------------------


def running_ids(docker: LabDocker, hostname: str) -> dict[str, tuple[Any, ...]]:
    """What the registry must hold: one service per running container, on port 80."""
    found = {}
    for item in docker.api.containers():
        name = item["Names"][0].lstrip("/")
        host_port = int(item["Ports"][0]["PublicPort"])
        found[f"{hostname}:{name}:80"] = ("busybox", IP, host_port, (), {})
    return found


async def start_registrator_process(docker: LabDocker, store: Facade,
                                    log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "consulate.control.cli", "registrator", "-cleanup", "-ip", IP,
            f"consul://{store.address}", stderr=out,
            env={**os.environ, "DOCKER_HOST": docker.url})


async def test_sigkill_while_containers_come_and_go(docker: LabDocker, store: Facade,
                                                    tmp_path: Path) -> None:
    hostname = socket.gethostname()  # the registrator process names services after it
    log = tmp_path / "registrator.log"
    first = await start_registrator_process(docker, store, log)
    try:
        ids = [await drun(docker, f"c{i}", publish={"80/tcp": 8000 + i}) for i in range(4)]
        await registered(store, running_ids(docker, hostname))

        async def churn() -> None:
            await drun(docker, "c4", publish={"80/tcp": 8004})
            await asyncio.to_thread(docker.api.kill, ids[0])
            await drun(docker, "c5", publish={"80/tcp": 8005})
            await asyncio.to_thread(docker.api.remove_container, ids[1], force=True)

        changes = asyncio.create_task(churn())
        await asyncio.sleep(0.3)
        first.send_signal(signal.SIGKILL)  # in the middle of the churn
        await first.wait()
        await changes
        await asyncio.to_thread(docker.api.kill, ids[2])  # and more while it is down
        await drun(docker, "c6", publish={"80/tcp": 8006})
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
    second = await start_registrator_process(docker, store, log)
    try:
        await registered(store, running_ids(docker, hostname))
        assert set(await catalog(store)) == {f"{hostname}:c{i}:80" for i in (3, 4, 5, 6)}
    finally:
        second.send_signal(signal.SIGTERM)
        assert await second.wait() == 0
    # c2 was killed while no registrator ran: the second one finds it dangling (c0
    # and c1 went during the churn, before or after the SIGKILL, whichever won).
    assert f"dangling: {hostname}:c2:80" in log.read_text()


async def test_dockerd_restart_leaves_no_ghosts(docker: LabDocker, store: Facade,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Without -cleanup: what died while the stream was down is settled by the sync that
    follows the reconnection. (dockerd kills containers on shutdown and restarts only
    those with a restart policy.)"""
    async with registrator(docker, f"consul://{store.address}", "-ip", IP):
        await drun(docker, "kept.0", publish={"80/tcp": 8000}, restart="always")
        await drun(docker, "lost.0", publish={"80/tcp": 8001})
        await registered(store, running_ids(docker, HOST))
        await asyncio.to_thread(docker.stop, remove_containers=False)
        await asyncio.to_thread(docker.start)
        await registered(store, {f"{HOST}:kept.0:80": ("busybox", IP, 8000, (), {})})
        assert running_ids(docker, HOST) == await catalog(store)
    assert any("reconnecting" in line for line in lines(caplog))
