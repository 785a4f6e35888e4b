"""Quiescence: wait for changes to settle before rendering, as consul-template's
``-wait min:max`` does (pure: the caller passes the clock).

Each change pushes the render ``min`` seconds later, but never later than ``max``
after the first change of the burst, so a constant stream of changes still
renders every ``max`` seconds and never more often than once per window: one
reload per window, whatever the number of changes (the reload storms of
consul-template and confd without ``-wait``).
"""

from __future__ import annotations

from dataclasses import dataclass

from consulate.control.service_definition import InvalidDefinition, parse_duration

MAX_FACTOR = 4  # consul-template: max defaults to 4x min


class BadWait(ValueError):
    """``--wait`` is not ``MIN[:MAX]`` with durations; the message shows an example."""


@dataclass(frozen=True)
class Wait:
    min: float = 0.0
    max: float = 0.0


def parse_wait(text: str) -> Wait:
    """``--wait 2s`` (max 8s) or ``--wait 2s:10s``; plain numbers are seconds."""
    low_text, sep, high_text = text.partition(":")
    try:
        low = _seconds(low_text)
        high = _seconds(high_text) if sep else low * MAX_FACTOR
    except (InvalidDefinition, ValueError):
        raise BadWait(f"--wait {text!r} is not MIN[:MAX] with durations such as 2s or "
                      "500ms:5s") from None
    if low < 0 or high < low:
        raise BadWait(f"--wait {text!r}: MIN must be 0 or more and MAX at least MIN")
    return Wait(low, high)


def _seconds(text: str) -> float:
    return float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)


class Quiescence:
    """When the pending burst of changes is due to render."""

    def __init__(self, wait: Wait) -> None:
        self.wait = wait
        self._first: float | None = None
        self._last = 0.0

    @property
    def pending(self) -> bool:
        return self._first is not None

    def change(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now

    def deadline(self) -> float | None:
        """When to render: ``min`` after the last change, at most ``max`` after the first."""
        if self._first is None:
            return None
        return min(self._last + self.wait.min, self._first + self.wait.max)

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def fired(self) -> None:
        """The burst was rendered: the next change starts a new window."""
        self._first = None
