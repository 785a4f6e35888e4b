"""Stopping background tasks the one way every component needs it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has finished, so that nothing it holds
    (sockets, watches) outlives the caller's own shutdown."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
