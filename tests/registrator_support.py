"""Stores for the registrator's tests: consulate's own Consul-compatible API in process,
and a real ZooKeeper server (Debian's zookeeper package) on a loopback address.

Both have their own address or port, so several test runs can share a machine;
ZooKeeper is a plain foreground Java process stopped by PID, never the system
service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from procstop import stop_process

from consulate.control.api_context import ApiContext
from consulate.control.http_api import build_app
from consulate.control.registry import EmbeddedRegistry

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")


def loopback_address() -> str:
    """A random 127.x.y.z, so that servers of concurrent runs never share an address."""
    a, b, c = os.urandom(3)
    return f"127.{a % 200 + 20}.{b}.{c % 250 + 2}"


@dataclass
class Facade:
    registry: EmbeddedRegistry
    address: str  # host:port

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


@contextlib.asynccontextmanager
async def facade(work: Path, port: int = 0) -> AsyncIterator[Facade]:
    """consulate's HTTP API (agent, catalog, KV) over an embedded registry, on 127.0.0.1.

    The registry persists in ``work``: a facade opened again on the same directory
    and port is the same store back after an outage.
    """
    registry = EmbeddedRegistry(work / "registry.db")
    registry.start()
    context = ApiContext(registry, node="n1", node_address="127.0.0.1", datacenter="dc1",
                         leader="127.0.0.1:8300", self_info=dict)
    runner = web.AppRunner(build_app(context), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    try:
        yield Facade(registry, f"127.0.0.1:{runner.addresses[0][1]}")
    finally:
        await runner.cleanup()
        await registry.close()


async def until(check: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Wait for ``check()`` (a value or an awaitable) to be truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"not reached within {timeout}s: {what}"
        await asyncio.sleep(0.05)


class ZooKeeperProcess:
    """``ZooKeeperServerMain`` on ``address:2181`` with a temporary data directory.

    A tick of 200 ms bounds sessions to 4 s (20 ticks), so ephemeral nodes of a
    killed client vanish quickly.
    """

    def __init__(self, work: Path, address: str) -> None:
        if shutil.which("java") is None or not ZOOKEEPER_JAR.exists():
            raise RuntimeError("ZooKeeper is not installed: run `make test` (apt zookeeper)")
        self.address = address
        self.port = 2181
        self._work = work
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> ZooKeeperProcess:
        self._work.mkdir(parents=True, exist_ok=True)
        config = self._work / "zoo.cfg"
        config.write_text(f"tickTime=200\ndataDir={self._work / 'data'}\n"
                          f"clientPort={self.port}\nclientPortAddress={self.address}\n"
                          "admin.enableServer=false\n")
        with (self._work / "zookeeper.log").open("ab") as log:
            self._process = subprocess.Popen(
                ["java", f"-Dzookeeper.log.dir={self._work}", "-cp",
                 f"{ZOOKEEPER_JAR}:/etc/zookeeper/conf",
                 "org.apache.zookeeper.server.ZooKeeperServerMain", str(config)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited: "
                                   f"{(self._work / 'zookeeper.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                    (self.address, self.port), timeout=1):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"ZooKeeper on {self.address}:{self.port} not up within {timeout}s")

    def stop(self) -> None:
        stop_process(self._process)
        self._process = None
