"""What the proxy and the native engine exchange: plain data, importable without the
C extension (so the proxy can be typed and tested where it is not built)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# What a limit-* result is about (its ``error`` field), in relay.c's LIMIT_* order.
LIMITS = ("max_connections", "max_pending_per_service", "descriptors")


@dataclass(frozen=True)
class RelayResult:
    """How one relayed connection ended, with its byte counters."""

    id: int
    bytes_a_to_b: int
    bytes_b_to_a: int
    spliced_a_to_b: int
    spliced_b_to_a: int
    # done | error | idle | stopped | connect-failed, and for accepted connections
    # unrouted (no original destination, or no such VIP) | no-endpoints | accept-failed;
    # ejected | returned: outlier detection took candidates[0] out of the service's
    # pool, or put it back (no connection: only service and candidates are set)
    reason: str
    error: int  # errno of an error, of the last attempt for connect-failed, of accept
    failed_mask: int = 0  # bit i: candidate i was tried and failed
    # Connections the engine accepted itself (reported only when there is
    # something to log: a refusal or a failed connect attempt).
    service: int = 0
    client: tuple[str, int] = ("0.0.0.0", 0)
    destination: tuple[str, int] = ("0.0.0.0", 0)  # the original one (the VIP)
    candidates: tuple[tuple[str, int], ...] = ()  # in the order they were to be tried
    failures: int = 0  # ejected: the consecutive connect failures that caused it
    ejections: int = 0  # ejected: how many times, this one included
    ejection_time: float = 0.0  # ejected: for how long (seconds)
    # limit-reached: a limit refused its first connection (error: the limit's
    # index in LIMITS); limit-cleared: that episode ended (the next
    # connection passed), ``failures`` connections refused in it (descriptors:
    # accept(2) failures, each pausing accepts for 0.1 s).


@dataclass(frozen=True)
class EngineStats:
    active: int
    pipes_pooled: int
    pipes_open: int
    accepted: int
    unrouted: int  # accepted connections whose destination is no known VIP
    overflow: int = 0  # accepted connections refused over max_connections


@dataclass(frozen=True)
class EngineRoute:
    """What the engine needs of one service to route its VIP: ids index the counters.

    ``lb`` is the balancer's index in proxy/balance.py's LB_NAMES (relay.c's LB_*),
    ``weights`` the endpoints' weights (lb=weighted), all 1 when not given.
    """

    service: int
    vip: str
    endpoints: Sequence[tuple[str, int]]
    lb: int = 0
    weights: Sequence[int] = ()


@dataclass(frozen=True)
class EngineServiceCounters:
    """One service's counters for the connections the engine accepted."""

    connections_total: int
    connections_active: int
    connect_failures: int
    rejected: int
    bytes_to_upstream: int
    bytes_to_client: int
    ejections: int = 0
    ejections_active: int = 0
    bytes_spliced_to_upstream: int = 0  # of bytes_to_upstream, moved by splice(2)
    bytes_spliced_to_client: int = 0
    pending_active: int = 0  # connecting to an endpoint now
    pending_overflow: int = 0  # refused over max_pending
