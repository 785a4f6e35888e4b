"""Run a module as ``python -m`` would, logging every slow cyclic-GC collection to stderr.

    python bench/watchers_gctrace.py -m consulate.control.cli agent ...

bench/watchers.py starts one extra agent this way (never the measured ones) to say
how long the collector stops the agent's event loop, by generation: a line
``gc-trace generation=G ms=T at=S`` for each collection of at least MIN_MS, S being
CLOCK_MONOTONIC when it ended.
"""

from __future__ import annotations

import gc
import runpy
import sys
import time
from typing import Any

MIN_MS = 1.0
PREFIX = "gc-trace"
_started = [0.0]


def _callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    took = 1e3 * (time.perf_counter() - _started[0])
    if took >= MIN_MS:
        at = time.clock_gettime(time.CLOCK_MONOTONIC)  # system-wide: the benchmark's clock
        sys.stderr.write(f"{PREFIX} generation={info['generation']} ms={took:.2f} at={at:.6f}\n")
        sys.stderr.flush()


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: watchers_gctrace.py -m MODULE [ARG...]")
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    gc.callbacks.append(_callback)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
