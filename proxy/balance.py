"""Endpoint selection: one balancer per service, chosen by the registry meta ``lb``.

Every balancer answers the same question: in which order should this connection
try the service's endpoints (the first is the pick, the rest the retry order,
all distinct)? Endpoints that outlier detection ejected are skipped unless every
endpoint is ejected (then all are used: Envoy's panic mode, better than refusing).
The logic is pure (no sockets, no clock, randomness injected), so each balancer
is tested by exact sequences; native/relay.c mirrors it for the engine, with the
same hash and the same orders, so a service behaves alike under either relay.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

LB_NAMES = ("round_robin", "least_conn", "p2c", "hash", "weighted")
DEFAULT_LB = "round_robin"

_MASK64 = (1 << 64) - 1


class Upstream(Protocol):
    """What a balancer needs of an endpoint (proxy/table.py's Endpoint has it)."""

    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def weight(self) -> int: ...


U = TypeVar("U", bound=Upstream)
Key = tuple[str, int]  # an endpoint as the data plane knows it: (address, port)


def key_of(endpoint: Upstream) -> Key:
    return endpoint.address, endpoint.port


def resolve_lb(meta: str) -> tuple[str, str | None]:
    """The balancer a service's ``lb`` meta asks for, and an error for an unknown one.

    An empty value is the default. An unknown value must not take the service
    down: it gets round robin, and the error (for the log) says what to write.
    """
    value = meta.strip().lower()
    if not value:
        return DEFAULT_LB, None
    if value in LB_NAMES:
        return value, None
    return DEFAULT_LB, (f"lb={meta!r} is not a balancer: use one of {'|'.join(LB_NAMES)}; "
                        f"using {DEFAULT_LB}")


@dataclass(frozen=True)
class PickContext:
    """What a connection brings to the pick besides the endpoints.

    ``client`` is the client's IPv4 address as an integer (hash), ``active`` the
    connections open or connecting to each endpoint (least_conn, p2c), ``ejected``
    the endpoints outlier detection took out of the pool.
    """

    client: int = 0
    active: Mapping[Key, int] = field(default_factory=dict)
    ejected: Collection[Key] = frozenset()


def _usable(endpoints: Sequence[U], ejected: Collection[Key]) -> list[int]:
    """Indices of the endpoints not ejected; all of them when every one is (panic)."""
    if not ejected:
        return list(range(len(endpoints)))
    usable = [i for i, e in enumerate(endpoints) if key_of(e) not in ejected]
    return usable or list(range(len(endpoints)))


def _ring_after(usable: list[int], pick: int) -> list[int]:
    """``pick`` first, then the other usable indices in ring order after it."""
    at = usable.index(pick)
    return usable[at:] + usable[:at]


class RoundRobin:
    """Hands out endpoints in turn; the next ones (in order) are the retries.

    The cursor survives endpoint changes, so adding an instance does not send
    the next connection back to the first one. Ejected endpoints are stepped over.
    """

    def __init__(self) -> None:
        self._next = 0

    def candidates(self, endpoints: Sequence[U], limit: int,
                   context: PickContext = PickContext()) -> list[U]:
        """Up to ``limit`` distinct endpoints, the first being this turn's pick."""
        count = len(endpoints)
        if count == 0:
            return []
        start = self._next % count
        if context.ejected:
            usable = set(_usable(endpoints, context.ejected))
            order = [i for i in ((start + k) % count for k in range(count)) if i in usable]
        else:  # the common case: no more work than the candidates need
            order = [(start + k) % count for k in range(min(limit, count))]
        self._next = order[0] + 1
        return [endpoints[i] for i in order[:limit]]


class LeastConn:
    """The endpoint with the fewest open connections (HAProxy's leastconn).

    Ties go round robin (a cursor, as HAProxy does), so idle endpoints share new
    connections evenly; retries follow in the same order (fewest first).
    """

    def __init__(self) -> None:
        self._next = 0

    def candidates(self, endpoints: Sequence[U], limit: int,
                   context: PickContext = PickContext()) -> list[U]:
        count = len(endpoints)
        if count == 0:
            return []
        start = self._next % count
        usable = _usable(endpoints, context.ejected)
        order = sorted(usable, key=lambda i: (context.active.get(key_of(endpoints[i]), 0),
                                              (i - start) % count))
        self._next = order[0] + 1
        return [endpoints[i] for i in order[:limit]]


class PowerOfTwoChoices:
    """Two endpoints drawn at random, the one with fewer open connections wins.

    Envoy's LEAST_REQUEST with choice_count 2: nearly as good as least_conn
    without looking at every endpoint. Ties go to the first drawn; retries are
    the other one drawn, then the rest in ring order after the pick.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def candidates(self, endpoints: Sequence[U], limit: int,
                   context: PickContext = PickContext()) -> list[U]:
        if not endpoints:
            return []
        usable = _usable(endpoints, context.ejected)
        if len(usable) == 1:
            return [endpoints[usable[0]]]
        first, second = self._rng.sample(usable, 2)

        def active(i: int) -> int:
            return context.active.get(key_of(endpoints[i]), 0)

        pick, other = (second, first) if active(second) < active(first) else (first, second)
        rest = [i for i in _ring_after(usable, pick) if i not in (pick, other)]
        return [endpoints[i] for i in [pick, other, *rest][:limit]]


class RendezvousHash:
    """Consistent hashing on the client's IP: a client keeps its endpoint.

    Rendezvous (highest random weight) hashing rather than a ring or Maglev:
    every endpoint gets a score from hash(client, endpoint) and the highest
    wins, so removing an endpoint moves only the clients it had (each to its
    next-highest score) with no virtual nodes to tune and no ring or lookup
    table to rebuild and store at every route change (the engine republishes
    its table on each registry change); scoring every endpoint per connection
    costs a few ns per endpoint, nothing for the tens a service has. The order
    of scores is also the retry order, consistent per client too. Weights are
    not used (lb=weighted is the balancer for them).
    """

    def candidates(self, endpoints: Sequence[U], limit: int,
                   context: PickContext = PickContext()) -> list[U]:
        usable = _usable(endpoints, context.ejected)
        order = sorted(usable, key=lambda i: (-hash_score(context.client, endpoints[i]), i))
        return [endpoints[i] for i in order[:limit]]


class SmoothWeighted:
    """Weighted round robin by each endpoint's weight, interleaved (nginx's smooth WRR).

    Each pick adds every endpoint's weight to its current weight, takes the
    highest (first on ties) and subtracts the total from it: weights 5,1,1 give
    a a b a c a a, not a a a a a b c. Deterministic, so the native engine makes
    the same sequence. Retries follow in ring order after the pick.
    """

    def __init__(self) -> None:
        self._current: dict[Key, int] = {}

    def candidates(self, endpoints: Sequence[U], limit: int,
                   context: PickContext = PickContext()) -> list[U]:
        if not endpoints:
            return []
        usable = _usable(endpoints, context.ejected)
        current = {key_of(e): self._current.get(key_of(e), 0) for e in endpoints}
        total, best = 0, usable[0]
        for i in usable:
            key = key_of(endpoints[i])
            weight = max(endpoints[i].weight, 1)
            current[key] += weight
            total += weight
            if current[key] > current[key_of(endpoints[best])]:
                best = i
        current[key_of(endpoints[best])] -= total
        self._current = current  # endpoints that left the service are forgotten
        return [endpoints[i] for i in _ring_after(usable, best)[:limit]]


Balancer = RoundRobin | LeastConn | PowerOfTwoChoices | RendezvousHash | SmoothWeighted


def new_balancer(lb: str, rng: random.Random | None = None) -> Balancer:
    """A fresh balancer for a name of ``LB_NAMES`` (``resolve_lb`` gives one)."""
    makers: dict[str, Callable[[], Balancer]] = {
        "round_robin": RoundRobin, "least_conn": LeastConn,
        "p2c": lambda: PowerOfTwoChoices(rng), "hash": RendezvousHash,
        "weighted": SmoothWeighted,
    }
    return makers[lb]()


def _mix64(x: int) -> int:
    """splitmix64's finalizer: every input bit affects every output bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=4096)
def ipv4_int(address: str) -> int:
    """An IPv4 address as an integer (host order), as relay.c computes it."""
    return int(ipaddress.IPv4Address(address))


def hash_score(client: int, endpoint: Upstream) -> int:
    """The rendezvous score of ``endpoint`` for ``client``; relay.c's hash_score."""
    return _mix64(((client << 32) | ipv4_int(endpoint.address))
                  ^ ((endpoint.port * 0x9E3779B97F4A7C15) & _MASK64))
