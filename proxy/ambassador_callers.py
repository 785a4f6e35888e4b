"""Who is calling: the container behind a source IP, cached (pure; the clock injected).

In omni mode every connection is routed by the rules of the container it comes
from, found by its source IP through the Docker API. Asking Docker for every
connection would cost a list and an inspect each time, so answers are kept:

- a container found stays until Docker reports it dead (``container_gone``, fed
  from the ``die``/``destroy`` events), so its IP can be reused by the next one;
  ``ttl`` bounds an entry anyway, in case an event was lost while the event
  stream reconnected;
- "no container has this IP" is kept ``miss_ttl`` only, and forgotten at once
  when a container starts (``container_started``), so a caller that connects
  the moment it starts is not refused for long; a flood of connections from
  somewhere else costs one Docker lookup per ``miss_ttl``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from consulate.proxy.ambassador_spec import Rules, container_rules

DEFAULT_TTL = 300.0
DEFAULT_MISS_TTL = 1.0


@dataclass(frozen=True)
class Caller:
    """A container as the ambassador routes it: its id, name and rules by port."""

    container_id: str
    name: str
    rules: Rules


@dataclass(frozen=True)
class Cached:
    """A cache hit: ``caller`` is None when it is known that no container has the IP."""

    caller: Caller | None


class CallerCache:
    """Callers by source IP."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *,
                 ttl: float = DEFAULT_TTL, miss_ttl: float = DEFAULT_MISS_TTL) -> None:
        self._clock = clock
        self._ttl = ttl
        self._miss_ttl = miss_ttl
        self._entries: dict[str, tuple[float, Caller | None]] = {}  # ip -> (expiry, caller)

    def get(self, ip: str) -> Cached | None:
        """What is known of ``ip``, or None when Docker must be asked."""
        entry = self._entries.get(ip)
        if entry is None:
            return None
        expiry, caller = entry
        if self._clock() >= expiry:
            del self._entries[ip]
            return None
        return Cached(caller)

    def put(self, ip: str, caller: Caller | None) -> None:
        ttl = self._ttl if caller is not None else self._miss_ttl
        self._entries[ip] = (self._clock() + ttl, caller)

    def container_gone(self, container_id: str) -> list[str]:
        """Forget the container (it died): the IPs it had, now forgotten."""
        gone = [ip for ip, (_, caller) in self._entries.items()
                if caller is not None and caller.container_id == container_id]
        for ip in gone:
            del self._entries[ip]
        return gone

    def container_started(self) -> None:
        """A container started: an IP known to have none may now have one."""
        for ip in [ip for ip, (_, caller) in self._entries.items() if caller is None]:
            del self._entries[ip]

    def clear(self) -> None:
        """Forget everything (the event stream broke: events may have been missed)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def caller_of(inspect: Mapping[str, Any]) -> tuple[list[str], Caller] | None:
    """A running container's addresses and rules, from its Docker inspect data."""
    state = inspect.get("State") or {}
    if not state.get("Running"):
        return None
    config = inspect.get("Config") or {}
    settings = inspect.get("NetworkSettings") or {}
    addresses = [network.get("IPAddress") for network in (settings.get("Networks") or {})
                 .values()] + [settings.get("IPAddress")]
    ips = sorted({ip for ip in addresses if ip})
    rules = container_rules(config.get("Env") or (), config.get("Labels") or {})
    return ips, Caller(str(inspect["Id"]), str(inspect.get("Name", "")).lstrip("/"), rules)
