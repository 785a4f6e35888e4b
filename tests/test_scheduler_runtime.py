"""The scheduler running for real on one host: registry (embedded), leader election,
duplex RPC between the leader and the node, the exec driver with real processes,
restarts with backoff, and a node that stops heartbeating."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from consulate.control.registry import EmbeddedRegistry, Instance
from consulate.control.scheduler.drivers import ExecDriver
from consulate.control.scheduler.executor import Executor
from consulate.control.scheduler.host import SchedulerHost
from consulate.control.scheduler.nodes import NODE_SERVICE, Node
from consulate.control.scheduler.runtime import (
    ALLOCS_PREFIX,
    JOBS_PREFIX,
    TICK,
    NodeAgent,
    SchedulerLeader,
)
from consulate.control.scheduler.service import Scheduler
from consulate.control.scheduler.spec import job_from_dict
from consulate.control.tasks import cancel_and_wait

TTL = 3.0


@pytest.fixture
async def host(registry: EmbeddedRegistry, tmp_path: Path) -> AsyncIterator[SchedulerHost]:
    started = SchedulerHost(registry, node="n1", advertise="127.0.0.1", datacenter="dc1",
                            data_dir=tmp_path, docker=f"unix://{tmp_path}/no-docker.sock",
                            ttl=TTL)
    started.start()
    await until(lambda: "n1" in started.scheduler.nodes)
    yield started
    await started.close()


async def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


def sleeper(count: int, **extra: object) -> dict[str, object]:
    return {"name": "sleeper", "strategy": "spread", **extra,
            "groups": [{"name": "s", "count": count, "driver": "exec",
                        "config": {"command": "sleep", "args": ["600"]},
                        "resources": {"cpu": 10, "memory": 10}}]}


def statuses(host: SchedulerHost) -> list[str]:
    return sorted(a.status for a in host.scheduler.job_allocations("sleeper"))


def pids(host: SchedulerHost) -> list[int]:
    driver = host.executor.drivers["exec"]
    return sorted(int(handle) for handle in driver._processes)  # type: ignore[attr-defined]


def cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


async def test_exec_allocations_run_restart_and_stop(host: SchedulerHost,
                                                     registry: EmbeddedRegistry) -> None:
    job = job_from_dict(sleeper(2, restart={"attempts": 3, "delay": "200ms",
                                            "interval": "1m"}))
    await host.submit(job)
    assert (await registry.kv_get(JOBS_PREFIX + "sleeper")) is not None
    await until(lambda: statuses(host) == ["running", "running"])
    running = pids(host)
    assert [cmdline(pid) for pid in running] == [b"sleep\x00600\x00"] * 2

    os.kill(running[0], signal.SIGKILL)  # a process this test's scheduler started
    victim = next(a for a in host.scheduler.job_allocations("sleeper")
                  if a.history[-1].detail == f"started {running[0]}")
    await until(lambda: victim.restarts == 1 and victim.status == "running")
    [restarted] = set(pids(host)) - {running[1]}  # the other one kept running
    assert [(h.status, h.detail) for h in victim.history] == [
        ("pending", "placed on n1"),
        ("running", f"started {running[0]}"),
        ("restarting", "exit status -9; restart 1 in 0.2s"),
        ("running", f"started {restarted}")]

    await host.stop("sleeper")
    await until(lambda: statuses(host) == ["complete", "complete"])
    assert pids(host) == []
    assert {a.history[-1].detail for a in host.scheduler.job_allocations("sleeper")} == {
        "stopped by the scheduler"}
    assert (await registry.kv_get(JOBS_PREFIX + "sleeper")) is None


async def test_a_node_that_misses_its_ttl_loses_its_allocations(
        host: SchedulerHost, registry: EmbeddedRegistry) -> None:
    """"ghost" registers as a node and is never heard of again (a host cut off at
    once): its allocation is replaced on n1 within TTL + 5 s."""
    ghost = Node("ghost", 100000, 100000, address="127.0.0.2", drivers=("exec",))
    await registry.register(Instance(id="node-ghost", name=NODE_SERVICE, address="127.0.0.2",
                                     port=0, meta=ghost.to_meta(), ttl=TTL, node="ghost"))
    registered = time.monotonic()
    await until(lambda: "ghost" in host.scheduler.nodes)
    await host.submit(job_from_dict(sleeper(2)))
    where = {a.node: a for a in host.scheduler.job_allocations("sleeper")}
    assert sorted(where) == ["ghost", "n1"]
    await until(lambda: where["ghost"].status == "lost")
    await until(lambda: statuses(host) == ["lost", "running", "running"])
    elapsed = time.monotonic() - registered
    assert elapsed < TTL + 5, elapsed
    lost = where["ghost"]
    assert lost.history[-1].detail == "node ghost missed its heartbeat TTL"
    [replacement] = [a for a in host.scheduler.job_allocations("sleeper")
                     if a.previous == lost.id]
    assert (replacement.node, replacement.index) == ("n1", lost.index)
    await host.stop("sleeper")
    await until(lambda: pids(host) == [])


async def test_unplaceable_job_stays_pending(host: SchedulerHost) -> None:
    job = job_from_dict({**sleeper(1), "constraints": [
        {"attribute": "${attr.kernel.name}", "value": "plan9"}]})
    plan = await host.submit(job)
    assert plan.place == []
    status = host.scheduler.job_status("sleeper")
    assert status["status"] == "pending"
    assert status["placement_failures"]["s"]["filtered"] == {
        "constraint ${attr.kernel.name} = plan9 not met: the node has 'linux'": 1}


async def test_a_new_leader_takes_over_running_allocations(
        registry: EmbeddedRegistry, tmp_path: Path) -> None:
    """Two candidates and one node; the leader leaves: the other one leads with the
    saved jobs and allocations, and the running process is left alone."""
    first, second = (SchedulerLeader(registry, Scheduler(), name=name, address="127.0.0.1",
                                     rpc_uri=f"unix://{tmp_path}/{name}.sock", ttl=TTL)
                     for name in ("a", "b"))
    driver = ExecDriver()
    executor = Executor({"exec": driver})
    node = NodeAgent(registry, Node("n1", 1000, 1000, drivers=("exec",)), executor, ttl=TTL)
    loop = asyncio.get_running_loop()
    leading = loop.create_task(first.run())
    await until(lambda: first.leading)
    others = [loop.create_task(second.run()), loop.create_task(node.run())]
    try:
        await until(lambda: "n1" in first.scheduler.nodes)
        job = job_from_dict(sleeper(1))
        await first.save_job(job)
        first.scheduler.submit(job)
        [allocation] = first.scheduler.job_allocations("sleeper")

        async def saved_status() -> str:
            entry = await registry.kv_get(ALLOCS_PREFIX + allocation.id)
            return "" if entry is None else str(json.loads(entry.value)["status"])

        async with asyncio.timeout(20):
            while await saved_status() != "running":
                await asyncio.sleep(0.05)
        [pid] = list(driver._processes)

        await cancel_and_wait(leading)  # the leader leaves (its candidate deregistered)
        await until(lambda: second.leading)
        await until(lambda: "n1" in second.scheduler.nodes)
        [taken] = second.scheduler.job_allocations("sleeper")
        assert (taken.id, taken.status, taken.node) == (allocation.id, "running", "n1")
        assert [h.status for h in taken.history] == ["pending", "running"]
        await asyncio.sleep(2 * TICK)  # a few passes: nothing is placed or restarted
        assert list(second.scheduler.allocations) == [allocation.id]
        assert list(driver._processes) == [pid]
        assert cmdline(int(pid)) == b"sleep\x00600\x00"
    finally:
        for task in others:
            await cancel_and_wait(task)
        if not leading.done():
            await cancel_and_wait(leading)
        await executor.close()
    assert driver._processes == {}
