"""The Python relay's live state of one service: its balancer, outlier detector and
the connections open to each endpoint (what least_conn and p2c compare).

The RouteTable says which endpoints a service has and which balancer it asks
for; this is what the data plane learns by using them. The native engine keeps
the same state in C (native/relay.c, struct upstream).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

from consulate.proxy.balance import Key, PickContext, U, ipv4_int, key_of, new_balancer
from consulate.proxy.outlier import Ejection, OutlierDetector, OutlierPolicy


class ServicePool:
    """Picks endpoints for one service and learns from how connecting to them went."""

    def __init__(self, lb: str, policy: OutlierPolicy | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.lb = lb
        self.balancer = new_balancer(lb, rng)
        self.outlier: OutlierDetector[Key] = OutlierDetector(policy, clock)
        self.active: dict[Key, int] = {}
        self._known: Sequence[object] = ()
        # What most picks bring (no client hash, nothing ejected): made once, not per
        # connection (``active`` is the live dict itself).
        self._plain = PickContext(active=self.active)

    def candidates(self, endpoints: Sequence[U], limit: int, client: str) -> list[U]:
        """The endpoints to try for a connection from ``client``, in order."""
        if endpoints is not self._known:  # the table replaces the tuple on every change
            self._known = endpoints
            self.outlier.forget({key_of(e) for e in endpoints})
        if self.lb != "hash" and not self.outlier.any_ejected:
            return self.balancer.candidates(endpoints, limit, self._plain)
        context = PickContext(client=ipv4_int(client) if self.lb == "hash" else 0,
                              active=self.active, ejected=self.outlier.ejected)
        return self.balancer.candidates(endpoints, limit, context)

    def connecting(self, endpoint: U) -> None:
        key = key_of(endpoint)
        self.active[key] = self.active.get(key, 0) + 1

    def closed(self, endpoint: U) -> None:
        """A connection to ``endpoint`` ended, or its connect failed: one less open."""
        key = key_of(endpoint)
        left = self.active.get(key, 0) - 1
        if left > 0:
            self.active[key] = left
        else:
            self.active.pop(key, None)

    def connected(self, endpoint: U) -> None:
        self.outlier.succeeded(key_of(endpoint))

    def failed(self, endpoint: U, endpoints: Sequence[U]) -> Ejection[Key] | None:
        """A connect to ``endpoint`` (one of ``endpoints``) failed; the ejection it caused."""
        return self.outlier.failed(key_of(endpoint), {key_of(e) for e in endpoints})
