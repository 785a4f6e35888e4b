"""Endpoint selection. Round robin now; the other balancers join in a later issue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class RoundRobin:
    """Hands out endpoints in turn; ``candidates`` gives the retry order too.

    The cursor survives endpoint changes, so adding an instance does not send
    the next connection back to the first one.
    """

    def __init__(self) -> None:
        self._next = 0

    def candidates(self, endpoints: Sequence[T], limit: int) -> list[T]:
        """Up to ``limit`` distinct endpoints, the first being this turn's pick."""
        count = len(endpoints)
        if count == 0:
            return []
        start = self._next % count
        self._next = start + 1
        return [endpoints[(start + k) % count] for k in range(min(limit, count))]
