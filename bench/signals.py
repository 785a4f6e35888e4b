"""Stop a benchmark cleanly on SIGINT or SIGTERM, wherever it was started from.

A benchmark owns network namespaces and server processes, which its ``finally``
blocks take down. Python raises KeyboardInterrupt for SIGINT only when SIGINT
was not ignored at start, and a shell's background job starts with it ignored;
SIGTERM (``kill``, a CI timeout) would end the process without any cleanup. So
both are made to raise KeyboardInterrupt explicitly.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def interrupt_on_signals() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt in the main thread."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def run_main(main: Callable[[], int]) -> int:
    """Run a benchmark's ``main`` with those signals, as exit status 130 when stopped."""
    interrupt_on_signals()
    try:
        return main()
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}): everything started was stopped",
              file=sys.stderr)
        return 130
