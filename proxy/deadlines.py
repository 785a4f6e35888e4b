"""Connect timeouts for the Python relay: many pending connects, one loop timer.

``asyncio.timeout`` costs, per connect, a Timeout object, a lookup of the current
task and a loop timer (with uvloop a libuv timer handle made, started, stopped
and closed): a few microseconds of a connection's budget. Every connect of the
proxy waits the same time (its connect timeout), so deadlines fall due in the
order they were set: one timer, armed for the earliest deadline still pending,
serves them all. (A shorter wait given after a longer one would be noticed
only once the longer one is due: give one ConnectDeadlines one value.)

A connect that runs out of time has its task cancelled, and ``expired`` tells
the task that the CancelledError it got is this timeout (then ``uncancel``ed,
as ``asyncio.timeout`` does), not a cancel from outside.
"""

from __future__ import annotations

import asyncio


class ConnectDeadlines:
    """Cancels each task still waiting ``seconds`` after its ``start``."""

    def __init__(self) -> None:
        self._due: dict[asyncio.Task[None], float] = {}  # insertion order is due order
        self._expired: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, task: asyncio.Task[None], seconds: float) -> None:
        """Give ``task`` ``seconds`` from now (a restart moves it to the back)."""
        due = self._due
        due.pop(task, None)
        loop = task.get_loop()
        when = due[task] = loop.time() + seconds
        if self._timer is None:
            self._timer = loop.call_at(when, self._fire, loop)

    def stop(self, task: asyncio.Task[None]) -> bool:
        """End ``task``'s wait; True when it had run out of time (and was cancelled)."""
        self._due.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def close(self) -> None:
        """Forget every wait (the proxy is closing: its tasks are cancelled anyway)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        self._expired.clear()

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        due = self._due
        while due:
            task, when = next(iter(due.items()))
            if when > now:
                self._timer = loop.call_at(when, self._fire, loop)
                return
            del due[task]
            self._expired.add(task)
            task.cancel()
