"""The agent's check runner: keeps the health of this node's instances current.

A Consul agent runs the checks of the services registered with it; so does
this one, for every instance whose ``node`` is its own. It follows the
registry's change stream (so checks registered through any path, and their
removal, are picked up), and the register handler also hands it new instances
directly so that a TTL update sent right after a registration finds its check.

Results are written to the registry only when a status changes (and
output-only changes at most every ``OUTPUT_UPDATE_INTERVAL``, as Consul's
check_update_interval), so a check that keeps passing costs no registry write
and wakes no watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from consulate.control.health.probes import Result, http_probe, script_probe, tcp_probe
from consulate.control.registry.backend import RegistryBackend
from consulate.control.registry.model import (
    Change,
    CheckStatus,
    HealthCheck,
    Instance,
    RegistryError,
    UnknownInstance,
)
from consulate.control.tasks import cancel_and_wait

log = logging.getLogger("consulate.health")

OUTPUT_UPDATE_INTERVAL = 300.0  # Consul's check_update_interval
WATCH_RETRY_DELAY = 1.0


class UnknownCheck(RegistryError):
    """A TTL update named a check this agent does not run."""


@dataclass
class _Monitor:
    """One running check: its definition, task, and TTL/deregistration timers."""

    instance_id: str
    check: HealthCheck
    task: asyncio.Task[None] | None = None
    ttl_renewed: asyncio.Event = field(default_factory=asyncio.Event)
    deregister_timer: asyncio.TimerHandle | None = None
    output_written_at: float = 0.0


class HealthRunner:
    """Runs the checks of the instances registered on ``node``."""

    def __init__(self, registry: RegistryBackend, node: str, *,
                 scripts_enabled: bool = False,
                 on_deregister: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._on_deregister = on_deregister  # the agent forgets it too: no re-registration
        self.node = node
        self.scripts_enabled = scripts_enabled
        self._clock = clock
        self._monitors: dict[str, _Monitor] = {}  # by check id
        self._follower: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def close(self) -> None:
        if self._follower is not None:
            await cancel_and_wait(self._follower)
            self._follower = None
        for check_id in list(self._monitors):
            await self._stop(check_id)
        for task in list(self._side_tasks):
            await cancel_and_wait(task)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- what the API calls ----------------------------------------------------

    def observe(self, instance: Instance) -> None:
        """Run (or stop) the checks of a just-registered instance of this node."""
        if instance.node == self.node:
            self._reconcile_instance(instance)

    async def update_ttl(self, check_id: str, status: CheckStatus, output: str) -> None:
        """``/v1/agent/check/pass|warn|fail|update``: a TTL check's new result."""
        monitor = self._monitors.get(check_id)
        if monitor is None:
            raise UnknownCheck(
                f"Unknown check ID {check_id!r}: this agent (node {self.node!r}) runs no check "
                "of that ID; list them with GET /v1/agent/checks")
        if monitor.check.kind != "ttl":
            raise UnknownCheck(f"CheckID {check_id!r} does not have associated TTL: only TTL "
                               f"checks take updates, this one is {monitor.check.kind.upper()}")
        monitor.ttl_renewed.set()
        await self._record(monitor, status, output, explicit=True)

    # -- following the registry ------------------------------------------------

    async def _follow(self) -> None:
        while True:
            try:
                async for change in self._registry.watch():
                    self._apply(change)
            except RegistryError as exc:
                log.warning("event=health-watch-retry error=%s retry_in=%.1fs", exc,
                            WATCH_RETRY_DELAY)
                await asyncio.sleep(WATCH_RETRY_DELAY)

    def _apply(self, change: Change) -> None:
        mine = [i for i in change.instances if i.node == self.node]
        if change.kind == "snapshot":
            present = {i.id for i in mine}
            for check_id, monitor in list(self._monitors.items()):
                if monitor.instance_id not in present:
                    self._spawn(self._stop(check_id))
        if change.kind == "down":
            for instance in mine:
                self._forget_instance(instance.id, keep=set())
            return
        for instance in mine:
            self._reconcile_instance(instance)

    def _reconcile_instance(self, instance: Instance) -> None:
        keep = {c.id for c in instance.checks}
        self._forget_instance(instance.id, keep)
        for check in instance.checks:
            monitor = self._monitors.get(check.id)
            if monitor is not None and monitor.instance_id == instance.id and \
                    monitor.check.same_definition(check):
                continue
            if monitor is not None:
                self._spawn(self._stop(check.id))
                self._monitors.pop(check.id, None)
            self._begin(instance.id, check)

    def _forget_instance(self, instance_id: str, keep: set[str]) -> None:
        for check_id, monitor in list(self._monitors.items()):
            if monitor.instance_id == instance_id and check_id not in keep:
                del self._monitors[check_id]
                self._spawn(self._stop_monitor(monitor))

    def _begin(self, instance_id: str, check: HealthCheck) -> None:
        monitor = _Monitor(instance_id, check)
        self._monitors[check.id] = monitor
        loop = asyncio.get_running_loop()
        runner = self._watch_ttl if check.kind == "ttl" else self._probe_forever
        monitor.task = loop.create_task(runner(monitor))
        if check.status == "critical":
            self._arm_deregister(monitor)
        log.info("event=check-start check_id=%s kind=%s instance=%s", check.id, check.kind,
                 instance_id)

    async def _stop(self, check_id: str) -> None:
        monitor = self._monitors.pop(check_id, None)
        if monitor is not None:
            await self._stop_monitor(monitor)

    async def _stop_monitor(self, monitor: _Monitor) -> None:
        if monitor.deregister_timer is not None:
            monitor.deregister_timer.cancel()
        if monitor.task is not None and monitor.task is not asyncio.current_task():
            await cancel_and_wait(monitor.task)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # -- running checks --------------------------------------------------------

    async def _probe_forever(self, monitor: _Monitor) -> None:
        check = monitor.check
        while True:
            status, output = await self._probe(check)
            await self._record(monitor, status, output)
            await asyncio.sleep(check.interval)

    async def _probe(self, check: HealthCheck) -> Result:
        if check.kind == "http":
            if self._session is None:
                self._session = aiohttp.ClientSession()
            return await http_probe(check, self._session)
        if check.kind == "tcp":
            return await tcp_probe(check)
        if not self.scripts_enabled:
            return "critical", ("Scripts are disabled on this agent: start it with "
                                "--enable-script-checks to run them")
        return await script_probe(check)

    async def _watch_ttl(self, monitor: _Monitor) -> None:
        """Critical when no update arrives within the TTL (Consul's TTL check)."""
        ttl = monitor.check.ttl or 0.0
        while True:
            monitor.ttl_renewed.clear()
            try:
                async with asyncio.timeout(ttl):
                    await monitor.ttl_renewed.wait()
            except TimeoutError:
                await self._record(monitor, "critical", f"TTL expired (no update in {ttl:g}s)")
                await monitor.ttl_renewed.wait()

    async def _record(self, monitor: _Monitor, status: CheckStatus, output: str, *,
                      explicit: bool = False) -> None:
        """Store a result when it changes what the registry says."""
        check = monitor.check
        try:
            instance = await self._registry.get(monitor.instance_id)
            held = next((c for c in instance.checks if c.id == check.id), None) \
                if instance is not None else None
            if instance is None or held is None or not held.same_definition(check):
                return  # replaced or removed meanwhile: the watch will tell
            now = self._clock()
            output_due = held.output != output and (
                explicit or now - monitor.output_written_at >= OUTPUT_UPDATE_INTERVAL)
            if held.status != status or output_due:
                await self._registry.register(
                    instance.with_check_result(check.id, status, output))
                monitor.output_written_at = now
                if held.status != status:
                    log.info("event=check-status check_id=%s instance=%s status=%s was=%s "
                             "output=%r", check.id, monitor.instance_id, status, held.status,
                             output[:200])
        except RegistryError as exc:
            log.warning("event=check-record-failed check_id=%s error=%s", check.id, exc)
            return
        if status == "critical":
            self._arm_deregister(monitor)
        elif monitor.deregister_timer is not None:
            monitor.deregister_timer.cancel()
            monitor.deregister_timer = None

    # -- DeregisterCriticalServiceAfter -----------------------------------------

    def _arm_deregister(self, monitor: _Monitor) -> None:
        after = monitor.check.deregister_after
        if after is None or monitor.deregister_timer is not None:
            return
        monitor.deregister_timer = asyncio.get_running_loop().call_later(
            after, lambda: self._spawn(self._deregister(monitor)))

    async def _deregister(self, monitor: _Monitor) -> None:
        log.info("event=deregister-critical instance=%s check_id=%s after=%gs",
                 monitor.instance_id, monitor.check.id, monitor.check.deregister_after or 0)
        if self._on_deregister is not None:
            self._on_deregister(monitor.instance_id)
        with contextlib.suppress(UnknownInstance):
            try:
                await self._registry.deregister(monitor.instance_id)
            except RegistryError as exc:
                log.warning("event=deregister-critical-failed instance=%s error=%s",
                            monitor.instance_id, exc)
