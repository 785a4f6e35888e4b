"""Delays between reconnection attempts: exponential, capped, with jitter.

Jitter keeps many peers that lost the same server (a restart) from redialing it
in lock-step. "Equal jitter": each delay is drawn from the upper half of the
current step, so it never collapses to zero (a tight loop) yet spreads by 2x.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """``next()`` gives the delay before the next attempt; ``reset()`` after a success."""

    def __init__(self, initial: float = 0.05, maximum: float = 5.0, factor: float = 2.0,
                 rng: Callable[[], float] = random.random) -> None:
        if not 0 < initial <= maximum or factor < 1:
            raise ValueError(f"backoff needs 0 < initial ({initial}) <= maximum ({maximum}) "
                             f"and factor ({factor}) >= 1")
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self._rng = rng
        self._step = initial

    def next(self) -> float:
        step = self._step
        self._step = min(self.maximum, step * self.factor)
        return step / 2 + self._rng() * step / 2

    def reset(self) -> None:
        self._step = self.initial
