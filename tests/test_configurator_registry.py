"""The pipeline following a real registry in process (embedded, and etcd for the
outage): byte-identical renders, no render from an empty service or a registry
that went away, and the reload storm test: 100 changes/s for 5 s give at most one
reload per quiescence window (HAProxy's real checker)."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from etcdproc import EtcdProcess
from registrator_support import loopback_address

from consulate.control.configurator import haproxy_cfg
from consulate.control.configurator.engine import NO_WAIT, Configurator, Template
from consulate.control.configurator.quiescence import Wait
from consulate.control.configurator.stores import FileStore, pretty
from consulate.control.configurator.target import TargetFile
from consulate.control.configurator.transformers import make_transformer
from consulate.control.registry import EmbeddedRegistry
from consulate.control.registry.backend import RegistryBackend
from consulate.control.registry.etcd import EtcdRegistry
from consulate.control.registry.model import Instance

DOCUMENT: dict[str, Any] = {
    "defaults": {"mode": "tcp", "timeout": {"connect": "1s", "client": "5s", "server": "5s"}},
    "frontend f": {"bind": "127.0.0.1:18999", "default_backend": "web"},
    "backend web": {"server": {"$services": "web", "format": "{id} {address}:{port}"}}}


def expected(*servers: str) -> str:
    document: dict[str, Any] = {**DOCUMENT, "backend web": {"server": list(servers)}}
    return haproxy_cfg.render(document)


def _configurator(tmp_path: Path, registry: RegistryBackend, wait: Wait = NO_WAIT,
                  document: Any = DOCUMENT) -> Configurator:
    (tmp_path / "doc.json").write_bytes(pretty(document))
    template = Template(make_transformer("haproxy-cfg"), TargetFile(tmp_path / "haproxy.cfg"),
                        "haproxy -c -q -f {{.src}}")
    return Configurator(FileStore(tmp_path / "doc.json"), [template], wait=wait,
                        reload=f"date +%s.%N >> {tmp_path}/reloads", registry=registry,
                        registry_describe="embedded")


async def _until(condition: Any, what: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def _web(n: int) -> Instance:
    return Instance(id=f"web-{n}", name="web", address=f"10.0.0.{n}", port=80)


async def test_follows_instances_and_keeps_the_last_output_when_empty(
        tmp_path: Path, registry: EmbeddedRegistry) -> None:
    await registry.register(_web(10))
    await registry.register(_web(9))
    configurator = _configurator(tmp_path, registry)
    target = tmp_path / "haproxy.cfg"
    await configurator.start()
    try:
        assert target.read_text() == expected("web-9 10.0.0.9:80", "web-10 10.0.0.10:80")
        await registry.deregister("web-10")
        await _until(lambda: target.read_text() == expected("web-9 10.0.0.9:80"), "web-10 goes")
        await _until(lambda: (tmp_path / "reloads").read_text().count("\n") == 2, "reloaded")
        reloads = (tmp_path / "reloads").read_text()
        await registry.deregister("web-9")
        await asyncio.sleep(1)  # the change has been rendered (and skipped) by then
        assert target.read_text() == expected("web-9 10.0.0.9:80")
        assert (tmp_path / "reloads").read_text() == reloads
        assert configurator.last_output == [expected("web-9 10.0.0.9:80")]
        await registry.register(_web(3))
        await _until(lambda: target.read_text() == expected("web-3 10.0.0.3:80"), "web-3 comes")
    finally:
        await configurator.close()


async def test_allow_empty_renders_an_empty_backend(tmp_path: Path,
                                                    registry: EmbeddedRegistry) -> None:
    document = {**DOCUMENT, "backend web": {"server": {
        "$services": "web", "format": "{id} {address}:{port}", "allow_empty": True}}}
    configurator = _configurator(tmp_path, registry, document=document)
    await configurator.start()
    try:
        assert (tmp_path / "haproxy.cfg").read_text() == expected()
    finally:
        await configurator.close()


async def test_same_registry_state_renders_the_same_bytes(tmp_path: Path,
                                                          registry: EmbeddedRegistry) -> None:
    for n in (5, 1, 3):
        await registry.register(_web(n))
    configurator = _configurator(tmp_path, registry)
    target = tmp_path / "haproxy.cfg"
    await configurator.start()
    try:
        first = target.read_bytes()
        assert first.decode() == expected("web-1 10.0.0.1:80", "web-3 10.0.0.3:80",
                                          "web-5 10.0.0.5:80")
        await registry.deregister("web-3")
        await _until(lambda: b"web-3" not in target.read_bytes(), "web-3 goes")
        await registry.register(_web(3))  # back as it was: new indexes, same instance
        await _until(lambda: target.read_bytes() == first, "web-3 is back, byte for byte")
        assert configurator.render(DOCUMENT)[0].text.encode() == first
    finally:
        await configurator.close()


async def test_reload_storm_gives_one_reload_per_window(tmp_path: Path,
                                                        registry: EmbeddedRegistry) -> None:
    """100 registry changes per second for 5 s with --wait 1s (max 4 s): every
    reload is at least a window apart, and the last one renders the final state."""
    await registry.register(_web(1))
    configurator = _configurator(tmp_path, registry, wait=Wait(1.0, 4.0))
    await configurator.start()
    reloads = tmp_path / "reloads"
    try:
        assert reloads.read_text().count("\n") == 1
        started = time.time()
        changes = 0
        while time.time() - started < 5.0:
            n = 2 + changes % 50
            if changes % 100 < 50:
                await registry.register(_web(n))
            else:
                await registry.deregister(f"web-{n}")
            changes += 1
            await asyncio.sleep(max(0.0, started + changes / 100 - time.time()))
        final = sorted((await registry.instances("web"))[0], key=lambda i: i.port)
        stopped = time.time()
        await _until(lambda: configurator.render(DOCUMENT)[0].text ==
                     (tmp_path / "haproxy.cfg").read_text(), "the final state rendered", 15)
        await asyncio.sleep(1.5)  # nothing more comes after the window
    finally:
        await configurator.close()
    times = [float(line) for line in reloads.read_text().split()][1:]
    assert changes >= 250  # the storm really happened, even on a busy machine
    assert 1 <= len(times) <= 3, times  # windows end at ~4 s (max) and ~6 s (min after last)
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times)), times
    assert all(t <= stopped + 1.0 + 2.0 for t in times), (times, stopped)
    assert len(final) >= 1


async def test_registry_outage_keeps_the_last_output(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """etcd goes away: the instances last read stay (no empty upstream, no reload);
    when it is back, changes flow again."""
    etcd = EtcdProcess(tmp_path / "etcd", loopback_address()).start()
    registry = EtcdRegistry([etcd.endpoint])
    try:
        await registry.register(_web(1))
        await registry.register(_web(2))
        configurator = _configurator(tmp_path, registry)
        target = tmp_path / "haproxy.cfg"
        await configurator.start()
        try:
            both = expected("web-1 10.0.0.1:80", "web-2 10.0.0.2:80")
            assert target.read_text() == both
            etcd.stop()
            await _until(lambda: "event=watch-reconnect" in caplog.text, "the watch broke")
            assert configurator.render(DOCUMENT)[0].text == both
            assert target.read_text() == both
            assert (tmp_path / "reloads").read_text().count("\n") == 1
            etcd.start()
            await registry.register(_web(3))
            await _until(lambda: target.read_text() == expected(
                "web-1 10.0.0.1:80", "web-2 10.0.0.2:80", "web-3 10.0.0.3:80"),
                "web-3 arrives after the outage")
        finally:
            await configurator.close()
    finally:
        await registry.close()
        etcd.stop()
