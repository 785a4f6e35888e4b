"""Component supervision (control/supervisor.py): failures are logged, reported and
retried with growing delays; a component keeps running once it recovers."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re

import pytest

from consulate.control.supervisor import Supervisor


async def test_a_failing_component_is_restarted_with_backoff(
        caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor(first_delay=0.01, max_delay=0.04)
    attempts: list[float] = []
    recovered = asyncio.Event()

    async def flaky() -> None:
        attempts.append(asyncio.get_running_loop().time())
        if len(attempts) <= 4:
            raise ConnectionError(f"registry down (attempt {len(attempts)})")
        recovered.set()
        await asyncio.Event().wait()  # runs until stopped

    with caplog.at_level(logging.ERROR, "consulate.supervisor"):
        supervisor.start("routes", flaky)
        await asyncio.wait_for(recovered.wait(), 5)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(gap >= expected * 0.9 for gap, expected in zip(gaps, (0.01, 0.02, 0.04, 0.04),
                                                               strict=True))
    status = supervisor.status()["routes"]
    assert (status["State"], status["Restarts"], status["LastError"]) == (
        "running", 4, "ConnectionError: registry down (attempt 4)")
    assert caplog.text.count("event=component-failed component=routes") == 4
    assert re.findall(r"restart_in=(\S+)s", caplog.text) == ["0.01", "0.02", "0.04", "0.04"]
    await supervisor.close()
    assert supervisor.status()["routes"]["State"] == "stopped"


async def test_a_component_that_returns_is_restarted_too() -> None:
    supervisor = Supervisor(first_delay=0.01)
    runs = 0
    twice = asyncio.Event()

    async def quits() -> None:
        nonlocal runs
        runs += 1
        if runs == 2:
            twice.set()
            await asyncio.Event().wait()

    supervisor.start("registrator", quits)
    await asyncio.wait_for(twice.wait(), 5)
    assert supervisor.status()["registrator"]["LastError"] == (
        "returned (a component must run until stopped)")
    await supervisor.close()
