"""Supervision of the agent's long-lived components.

A component is a coroutine that should run for the agent's whole life (the
registry watch that feeds the routes, the registrator). One that fails is
logged and restarted with exponential backoff, never silently lost; its state,
restarts and last error are what ``/v1/agent/self`` reports. A component that
ran for a while before failing starts again from the shortest delay, so a rare
failure does not inherit the backoff of an old outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from consulate.control.tasks import cancel_and_wait

log = logging.getLogger("consulate.supervisor")

FIRST_DELAY = 0.1
MAX_DELAY = 10.0
STABLE_AFTER = 30.0  # seconds of running that reset the backoff

Factory = Callable[[], Coroutine[Any, Any, None]]


@dataclass
class ComponentState:
    state: str = "starting"  # running | restarting | stopped
    restarts: int = 0
    last_error: str = ""
    since: float = 0.0  # when the state was entered (time.time())

    def as_json(self) -> dict[str, Any]:
        return {"State": self.state, "Restarts": self.restarts, "LastError": self.last_error,
                "Since": round(self.since, 3)}


class Supervisor:
    """Runs components and restarts the ones that fail."""

    def __init__(self, *, first_delay: float = FIRST_DELAY, max_delay: float = MAX_DELAY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.states: dict[str, ComponentState] = {}

    def start(self, name: str, factory: Factory) -> None:
        """Run ``factory()`` as component ``name`` until close."""
        self.states[name] = ComponentState(since=time.time())
        self._tasks[name] = asyncio.get_running_loop().create_task(self._keep(name, factory))

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: state.as_json() for name, state in sorted(self.states.items())}

    async def close(self) -> None:
        for name, task in list(self._tasks.items()):
            await cancel_and_wait(task)
            self.states[name].state = "stopped"
            self.states[name].since = time.time()
        self._tasks.clear()

    async def _keep(self, name: str, factory: Factory) -> None:
        state = self.states[name]
        delay = self._first_delay
        while True:
            state.state, state.since = "running", time.time()
            started = self._clock()
            try:
                await factory()
                failure = "returned (a component must run until stopped)"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: logged and retried
                failure = f"{type(exc).__name__}: {exc}"
            if self._clock() - started >= STABLE_AFTER:
                delay = self._first_delay
            state.state, state.since = "restarting", time.time()
            state.restarts += 1
            state.last_error = failure
            log.error("event=component-failed component=%s error=%r restarts=%d "
                      "restart_in=%gs", name, failure, state.restarts, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_delay)
