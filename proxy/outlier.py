"""Outlier detection: endpoints that keep refusing connections leave the pool for a while.

Envoy's model, for connect failures (its consecutive_local_origin_failure): an
endpoint with ``consecutive_failures`` failed connects in a row (a success
resets the count) is ejected for ``base_ejection_time`` x the number of times it
was ejected, at most ``max_ejection_time``; each ``base_ejection_time`` spent
back in the pool without an ejection takes one off that number, so a flapping
endpoint stays out longer and a recovered one is soon forgiven. No more than
``max_ejection_percent`` of a pool is ever ejected: the last endpoints are
better tried than refused. Pure logic with an injected clock; the proxy logs
the events it returns, and native/relay.c implements the same rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

DEFAULT_CONSECUTIVE_FAILURES = 5  # Envoy's consecutive_local_origin_failure
DEFAULT_BASE_EJECTION_TIME = 30.0  # Envoy's base_ejection_time
DEFAULT_MAX_EJECTION_TIME = 300.0  # Envoy's max_ejection_time
DEFAULT_MAX_EJECTION_PERCENT = 50  # Envoy's default is 10; half a pool here


@dataclass(frozen=True)
class OutlierPolicy:
    consecutive_failures: int = DEFAULT_CONSECUTIVE_FAILURES
    base_ejection_time: float = DEFAULT_BASE_EJECTION_TIME
    max_ejection_time: float = DEFAULT_MAX_EJECTION_TIME
    max_ejection_percent: int = DEFAULT_MAX_EJECTION_PERCENT

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures={self.consecutive_failures}: give 1 or more")
        if not self.base_ejection_time > 0:
            raise ValueError(f"base_ejection_time={self.base_ejection_time}: give seconds > 0")
        if not self.max_ejection_time >= 0:
            raise ValueError(f"max_ejection_time={self.max_ejection_time}: give seconds >= 0")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent={self.max_ejection_percent}: give 0 to 100")

    def may_eject(self, ejected: int, pool: int) -> bool:
        """Whether one more ejection keeps ejected endpoints within the percentage."""
        return (ejected + 1) * 100 <= pool * self.max_ejection_percent

    def ejection_time(self, ejections: int) -> float:
        return min(self.base_ejection_time * ejections,
                   max(self.max_ejection_time, self.base_ejection_time))


@dataclass(frozen=True)
class Ejection(Generic[K]):
    """An endpoint left the pool: after ``failures`` failed connects, for ``seconds``."""

    key: K
    failures: int
    ejections: int  # how many times it was ejected, this one included (after forgiveness)
    seconds: float


@dataclass
class _Health:
    failures: int = 0  # consecutive
    ejections: int = 0
    ejected_until: float | None = None
    returned_at: float | None = None


class OutlierDetector(Generic[K]):
    """Tracks connect outcomes per endpoint key and decides ejections and returns."""

    def __init__(self, policy: OutlierPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy if policy is not None else OutlierPolicy()
        self._clock = clock
        self._health: dict[K, _Health] = {}
        self._ejected: set[K] = set()

    @property
    def ejected(self) -> frozenset[K]:
        """The endpoints out of the pool now (until ``release_due`` returns them)."""
        return frozenset(self._ejected)

    @property
    def any_ejected(self) -> bool:
        """Whether any endpoint is out now (cheaper than ``ejected`` for the common no)."""
        return bool(self._ejected)

    def ejected_in(self, pool: Collection[K]) -> int:
        return sum(1 for key in self._ejected if key in pool)

    def succeeded(self, key: K) -> None:
        health = self._health.get(key)
        if health is not None:
            health.failures = 0

    def failed(self, key: K, pool: Collection[K]) -> Ejection[K] | None:
        """Count a failed connect to ``key`` (one of ``pool``); the ejection it causes.

        Failures of an endpoint already out (connects started before it was
        ejected) change nothing. An endpoint the percentage keeps in stays
        at its count, so it is ejected at its next failure once there is room.
        """
        health = self._health.setdefault(key, _Health())
        if health.ejected_until is not None:
            return None
        health.failures += 1
        if health.failures < self.policy.consecutive_failures or key not in pool:
            return None
        if not self.policy.may_eject(self.ejected_in(pool), len(pool)):
            return None
        now = self._clock()
        if health.returned_at is not None:  # forgiveness for the time it behaved
            behaved = int((now - health.returned_at) // self.policy.base_ejection_time)
            health.ejections = max(health.ejections - behaved, 0)
        health.ejections += 1
        seconds = self.policy.ejection_time(health.ejections)
        health.ejected_until = now + seconds
        self._ejected.add(key)
        return Ejection(key, health.failures, health.ejections, seconds)

    def next_return(self) -> float | None:
        """When the first ejected endpoint is due back (clock time), if any is out."""
        times = [self._health[key].ejected_until for key in self._ejected]
        return min((t for t in times if t is not None), default=None)

    def release_due(self) -> list[K]:
        """Return to the pool every endpoint whose ejection is over; those keys."""
        now = self._clock()
        due = []
        for key in sorted(self._ejected, key=repr):
            health = self._health[key]
            if health.ejected_until is not None and health.ejected_until <= now:
                health.ejected_until, health.returned_at, health.failures = None, now, 0
                due.append(key)
        self._ejected.difference_update(due)
        return due

    def forget(self, keep: Collection[K]) -> None:
        """Drop the state of endpoints not in ``keep`` (they left the service)."""
        for key in [k for k in self._health if k not in keep]:
            del self._health[key]
            self._ejected.discard(key)
