"""Connection limits of the transparent proxy: what they are, when one is reached,
and when to say so (pure logic: no sockets, no clock of its own, no logging).

Two limits, with Envoy's circuit-breaker meaning and names:

* ``max_connections``: connections relayed at once by the whole agent (both
  relays count the connections they accepted, connecting or established);
* ``max_pending_per_service``: connections of one service still connecting to
  an endpoint (Envoy's ``max_pending_requests``): a service whose endpoints
  stall (SYNs unanswered until the connect timeout) cannot take every
  descriptor of the agent from the services that work.

A connection over a limit is accepted and reset at once (RST), as Envoy's
circuit breakers do, not left in the listen backlog as HAProxy's ``maxconn``
does: the one listener takes every service's connections, so a backlog held
for one stalled service would stall all of them; and a client that is reset
learns at once and can retry or fail over, where one left in the backlog waits
for its own connect timeout with nothing to tell it why. Connections already
relayed are never touched. Refusals are counted (Envoy's ``downstream_cx_overflow``
and ``upstream_rq_pending_overflow``) and logged once per episode
(``LimitEpisodes``), not once per connection: a flood must not flood the log.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

DEFAULT_MAX_PENDING_PER_SERVICE = 1024  # Envoy's max_pending_requests default
MAX_CONNECTIONS_CEILING = 65536
RESERVED_FDS = 256  # the API, DNS, registry, watchers and logs keep these free
FDS_PER_CONNECTION = 2  # the client's socket and the upstream's

MAX_CONNECTIONS = "max_connections"
MAX_PENDING_PER_SERVICE = "max_pending_per_service"


class LimitError(ValueError):
    """A limit was given a value the proxy cannot use; the message names the flag."""


def default_max_connections(nofile_soft: int | None = None) -> int:
    """What ``--max-connections`` is when not given, derived from RLIMIT_NOFILE as
    HAProxy derives ``maxconn`` from ``ulimit -n``: the descriptors left after a
    reserve, two per connection, at most 65536. Over it, connections are refused
    cleanly rather than failing in accept(2) with EMFILE.
    """
    if nofile_soft is None:
        nofile_soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile_soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS_CEILING
    return max(1, min(MAX_CONNECTIONS_CEILING, (nofile_soft - RESERVED_FDS) // FDS_PER_CONNECTION))


@dataclass(frozen=True)
class ConnectionLimits:
    """The two limits; a bad value raises LimitError naming its flag."""

    max_connections: int = MAX_CONNECTIONS_CEILING
    max_pending_per_service: int = DEFAULT_MAX_PENDING_PER_SERVICE

    def __post_init__(self) -> None:
        for flag, value in (("--max-connections", self.max_connections),
                            ("--max-pending-per-service", self.max_pending_per_service)):
            if not 1 <= value <= 2**31 - 1:
                raise LimitError(f"{flag} {value} must be from 1 to {2**31 - 1} "
                                 "(connections; the limit refuses new ones beyond it)")


@dataclass
class Episode:
    """One stretch of time during which a limit refused connections."""

    limit: str  # MAX_CONNECTIONS | MAX_PENDING_PER_SERVICE
    service: str  # "" for the agent-wide limit
    value: int  # the limit's value
    started: float
    refused: int = 0


class LimitEpisodes:
    """Turns refusals and admissions into at most two events per episode.

    An episode starts at a refusal when none is running for that limit (and
    service): ``refused`` returns it then, to be logged. It ends at the next
    admission under that limit: ``admitted`` returns it then, with how many
    connections it refused. Between the two, refusals are only counted.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], Episode] = {}

    def refused(self, limit: str, service: str, value: int, now: float) -> Episode | None:
        key = (limit, service)
        episode = self._open.get(key)
        started = episode is None
        if episode is None:
            episode = self._open[key] = Episode(limit, service, value, now)
        episode.refused += 1
        return episode if started else None

    def admitted(self, limit: str, service: str) -> Episode | None:
        return self._open.pop((limit, service), None) if self._open else None

    def ongoing(self) -> list[Episode]:
        return list(self._open.values())


def reached_line(episode: Episode) -> str:
    """The log line of an episode's start (key=value, one line)."""
    where = f" service={episode.service}" if episode.service else ""
    return (f"event=limit-reached limit={episode.limit} value={episode.value}{where} "
            "action=refuse")


def cleared_line(episode: Episode, now: float) -> str:
    """The log line of an episode's end: how long it lasted, how many it refused."""
    where = f" service={episode.service}" if episode.service else ""
    return (f"event=limit-cleared limit={episode.limit} value={episode.value}{where} "
            f"refused={episode.refused} seconds={max(now - episode.started, 0.0):.3f}")
