"""The agent's side of allocations: start them with a driver, supervise them, restart
them with backoff as the job's restart policy says, and report every change.

One supervisor task per allocation. The restart policy is Nomad's: up to
``attempts`` restarts within ``interval``; the n-th restart waits ``delay * 2^(n-1)``
(capped at the interval); once the attempts are spent, mode ``fail`` reports the
allocation failed (the scheduler may reschedule it elsewhere) and mode ``delay``
waits for the interval to pass and starts counting again. A batch task that
exits 0 is complete; a service task that exits is restarted like a failure.

``start`` and ``stop`` are idempotent by allocation id: the scheduler repeats them
until the state it wants is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from consulate.control.scheduler.drivers import Driver, DriverError, TaskSpec
from consulate.control.scheduler.spec import RestartPolicy
from consulate.control.tasks import cancel_and_wait

log = logging.getLogger("consulate.scheduler.executor")


@dataclass(frozen=True)
class TaskEvent:
    alloc_id: str
    status: str  # running, restarting, complete, failed
    detail: str
    restarts: int

    def to_json(self) -> dict[str, Any]:
        return {"alloc_id": self.alloc_id, "status": self.status, "detail": self.detail,
                "restarts": self.restarts}


def restart_delay(policy: RestartPolicy, restart: int) -> float:
    """The wait before the ``restart``-th restart (1-based): doubling, capped."""
    return min(policy.delay * 2.0 ** (restart - 1), max(policy.interval, policy.delay))


class Executor:
    def __init__(self, drivers: Mapping[str, Driver]) -> None:
        self.drivers = dict(drivers)
        self.latest: dict[str, TaskEvent] = {}
        self._supervisors: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[str] = set()
        self._subscribers: list[asyncio.Queue[TaskEvent]] = []

    def start(self, task: TaskSpec, policy: RestartPolicy, batch: bool) -> None:
        if task.alloc_id in self._supervisors or task.alloc_id in self.latest:
            return  # already running, or finished: a repeated request
        if task.driver not in self.drivers:
            self._emit(TaskEvent(task.alloc_id, "failed", f"driver {task.driver} is not "
                                 "available on this node", 0))
            return
        self._supervisors[task.alloc_id] = asyncio.get_running_loop().create_task(
            self._supervise(task, policy, batch), name=f"alloc {task.alloc_id[:8]}")

    async def stop(self, alloc_id: str) -> None:
        supervisor = self._supervisors.get(alloc_id)
        if supervisor is None:
            return
        self._stopping.add(alloc_id)
        await cancel_and_wait(supervisor)

    async def close(self) -> None:
        for alloc_id in list(self._supervisors):
            await self.stop(alloc_id)

    async def events(self, idle: float) -> AsyncIterator[TaskEvent | None]:
        """The latest event of every allocation, then each new one, for as long as
        the caller reads (a duplex stream to the scheduler); None after ``idle``
        seconds without one (the stream's heartbeat)."""
        queue: asyncio.Queue[TaskEvent] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            for event in list(self.latest.values()):
                yield event
            while True:
                try:
                    async with asyncio.timeout(idle):
                        event = await queue.get()
                except TimeoutError:
                    yield None
                else:
                    yield event
        finally:
            self._subscribers.remove(queue)

    def _emit(self, event: TaskEvent) -> None:
        self.latest[event.alloc_id] = event
        log.info("event=task-%s alloc=%s restarts=%d detail=%r", event.status,
                 event.alloc_id[:8], event.restarts, event.detail)
        for queue in self._subscribers:
            queue.put_nowait(event)

    async def _supervise(self, task: TaskSpec, policy: RestartPolicy, batch: bool) -> None:
        driver = self.drivers[task.driver]
        restarts, window = 0, list[float]()  # restart times within the policy's interval
        handle = ""
        try:
            while True:
                try:
                    handle = await driver.start(task)
                    self._emit(TaskEvent(task.alloc_id, "running", f"started {handle[:12]}",
                                         restarts))
                    code = await driver.wait(handle)
                    await driver.stop(handle)
                    handle = ""
                    outcome = f"exit status {code}"
                    if batch and code == 0:
                        self._emit(TaskEvent(task.alloc_id, "complete", outcome, restarts))
                        return
                except DriverError as exc:
                    outcome = str(exc)
                now = time.monotonic()
                window = [t for t in window if now - t < policy.interval]
                if len(window) >= policy.attempts:
                    if policy.mode == "fail":
                        self._emit(TaskEvent(task.alloc_id, "failed",
                                             f"{outcome}; restart attempts exhausted",
                                             restarts))
                        return
                    wait = policy.interval - (now - window[0])
                    self._emit(TaskEvent(task.alloc_id, "restarting",
                                         f"{outcome}; attempts exhausted, waiting "
                                         f"{wait:.1f}s (mode delay)", restarts))
                    await asyncio.sleep(wait)
                    window = []
                    continue
                window.append(now)
                restarts += 1
                delay = restart_delay(policy, len(window))
                self._emit(TaskEvent(task.alloc_id, "restarting",
                                     f"{outcome}; restart {restarts} in {delay:.1f}s",
                                     restarts))
                await asyncio.sleep(delay)
        finally:
            if handle:
                with contextlib.suppress(Exception):
                    await driver.stop(handle)
            self._supervisors.pop(task.alloc_id, None)
            if task.alloc_id in self._stopping:
                self._stopping.discard(task.alloc_id)
                self._emit(TaskEvent(task.alloc_id, "complete", "stopped by the scheduler",
                                     restarts))
