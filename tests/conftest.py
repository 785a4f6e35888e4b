"""Shared fixtures: a lab with a running agent, and helpers to run test peers in it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from apiclient import api, registry  # noqa: F401 (the API tests' fixtures)
from duplexfix import endpoints  # noqa: F401 (the Duplex tests' tcp/unix fixture)

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent

NETSVC = str(Path(__file__).with_name("netsvc.py"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Lab tests need root and iproute2: fail loudly rather than skip quietly in CI."""
    if os.geteuid() == 0 and shutil.which("ip"):
        return
    reason = "lab tests need root and iproute2 (run `make test` as root)"
    for item in items:
        if item.get_closest_marker("lab") and os.environ.get("CI"):
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True, run=False))


class Peers:
    """Starts test servers in lab containers and runs test clients there."""

    def __init__(self, lab: labmod.Lab) -> None:
        self.lab = lab
        self.servers: dict[str, subprocess.Popen[bytes]] = {}

    def serve(self, where: str, ident: str, port: int, mode: str = "echo") -> None:
        proc = self.lab.popen(
            where, [sys.executable, NETSVC, "serve", "--port", str(port), "--id", ident,
                    "--mode", mode],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"listening\n", f"server {ident} did not start"
        self.servers[ident] = proc

    def kill(self, ident: str) -> None:
        proc = self.servers.pop(ident)
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def run(self, where: str, *args: str, timeout: float = 120) -> list[dict[str, Any]]:
        done = self.lab.exec(where, [sys.executable, NETSVC, *args],
                             capture_output=True, timeout=timeout)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return [json.loads(line) for line in done.stdout.splitlines()]

    def connect(self, where: str, host: str, port: int, *, count: int = 1,
                size: int = 1) -> list[dict[str, Any]]:
        return self.run(where, "connect", "--host", host, "--port", str(port),
                        "--count", str(count), "--size", str(size))

    def stop_all(self) -> None:
        for ident in list(self.servers):
            self.kill(ident)


@pytest.fixture(scope="module")
def mesh_lab() -> Iterator[labmod.Lab]:
    with labmod.up(hosts=1, containers=5) as built:
        yield built


@pytest.fixture(scope="module", params=["native", "python"])
def agent(
    request: pytest.FixtureRequest, mesh_lab: labmod.Lab, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LabAgent]:
    """The agent in h1, once with each relay: the end-to-end suite runs against both."""
    work = tmp_path_factory.mktemp(f"agent-{request.param}")
    running = LabAgent(mesh_lab, 1, work / "data", work / "agent.log",
                       extra_args=["--relay", request.param, "--connect-timeout", "1",
                                   # a test module may add flags (AGENT_EXTRA_ARGS)
                                   *getattr(request.module, "AGENT_EXTRA_ARGS", ())]).start()
    stats = running.api("GET", "/v1/agent/self")["Stats"]
    assert stats["relay"]["engine"] == request.param
    assert stats["iptables"]["tcp_intercept"] == "sk-lookup"  # the default, where BPF works
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def peers(mesh_lab: labmod.Lab, agent: LabAgent) -> Iterator[Peers]:
    """Test servers, started afresh for each agent (each relay)."""
    started = Peers(mesh_lab)
    try:
        yield started
    finally:
        started.stop_all()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests run on uvloop, as the agent does."""
    return {"uvloop": uvloop.new_event_loop}
