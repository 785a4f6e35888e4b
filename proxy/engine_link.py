"""What passes between the proxy and the native engine: the route table out,
counters and reports in.

The engine routes by a table it can read without Python (VIP -> service id ->
endpoints, balancer, weights), rebuilt here from the RouteTable at every change;
its per-service counters are indexed by the same ids. It reports only what must
be logged (refusals, failed connects, ejections and returns, limit episodes),
and this writes those lines as the Python relay does (proxy/proxy_log.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

from consulate.native.model import LIMITS, EngineRoute, RelayResult
from consulate.proxy import proxy_log
from consulate.proxy.balance import LB_NAMES
from consulate.proxy.limits import MAX_PENDING_PER_SERVICE, ConnectionLimits, LimitEpisodes
from consulate.proxy.outlier import Ejection
from consulate.proxy.stats import ProxyStats, ServiceCounters
from consulate.proxy.table import RouteTable

if TYPE_CHECKING:
    from consulate.native.engine import SpliceEngine

log = logging.getLogger("consulate.proxy")


class EngineLink:
    """One engine's view of the proxy: service ids, route publication, reports."""

    def __init__(self, engine: SpliceEngine, table: RouteTable, limits: ConnectionLimits,
                 episodes: LimitEpisodes) -> None:
        self.engine = engine
        self._table = table
        self._limits = limits
        self._episodes = episodes
        self._service_ids: dict[str, int] = {}  # the engine's counters are indexed by these

    def publish_routes(self, _version: int = 0) -> None:
        """Give the engine the table it routes by, rebuilt from the RouteTable."""
        routes = []
        for service in self._table.services():
            service_id = self._service_ids.setdefault(service.name, len(self._service_ids))
            routes.append(EngineRoute(service_id, str(service.vip),
                                      [(e.address, e.port) for e in service.tcp_endpoints],
                                      lb=LB_NAMES.index(service.lb),
                                      weights=[e.weight for e in service.tcp_endpoints]))
        self.engine.set_routes(routes)

    def merge_counters(self, stats: ProxyStats) -> None:
        """Copy the engine's counters into ``stats`` (they are the engine's to keep)."""
        names = sorted(self._service_ids, key=self._service_ids.__getitem__)
        for name, counters in zip(names, self.engine.service_counters(len(names)),
                                  strict=False):
            stats.services[name] = ServiceCounters(**asdict(counters))
        engine_stats = self.engine.stats()
        stats.unrouted = engine_stats.unrouted
        stats.overflow = engine_stats.overflow

    def log_reports(self) -> None:
        """Log what the engine refused or failed to connect, as the Python path does."""
        self._log(self.engine.poll())

    def _log(self, results: Sequence[RelayResult]) -> None:
        table = self._table
        names = {service_id: name for name, service_id in self._service_ids.items()}
        for result in results:
            client, (vip, port) = result.client, result.destination
            name = names.get(result.service, "?")
            if result.reason == "unrouted":
                reason = "unknown-vip" if result.error == 0 else "no-original-destination"
                log.warning("event=reject client=%s:%d destination=%s:%d reason=%s", *client,
                            vip, port, reason)
            elif result.reason == "no-endpoints":
                log.warning("event=reject client=%s:%d service=%s vip=%s reason=no-endpoints",
                            *client, name, vip)
            elif result.reason == "accept-failed":  # then paused, until an accept works
                log.warning("event=accept-failed error=%r action=pause-accept",
                            os.strerror(result.error))
            elif result.reason in ("limit-reached", "limit-cleared"):
                self._limit_report(result, name)
                continue
            elif result.reason == "ejected":
                proxy_log.ejected(table, name, Ejection(result.candidates[0], result.failures,
                                                        result.ejections,
                                                        result.ejection_time))
                continue
            elif result.reason == "returned":
                proxy_log.returned(table, name, *result.candidates[0])
                continue
            for i, (address, endpoint_port) in enumerate(result.candidates):
                if result.failed_mask & (1 << i):
                    log.warning("event=connect-failed service=%s endpoint=%s address=%s:%d",
                                name, proxy_log.endpoint_id(table, name, address,
                                                            endpoint_port),
                                address, endpoint_port)
            if result.reason == "connect-failed":
                log.warning("event=reject client=%s:%d service=%s reason=all-attempts-failed "
                            "attempts=%d error=%r", *client, name, len(result.candidates),
                            os.strerror(result.error))

    def _limit_report(self, result: RelayResult, name: str) -> None:
        """The engine reports an episode's first refusal and its end (with the count
        of refusals): log them as the Python relay does, timed here."""
        limit = LIMITS[result.error]
        now = time.monotonic()
        if limit == "descriptors":  # accepts paused after EMFILE/ENFILE, and resumed
            log.warning("event=accept-resumed failures=%d", result.failures)
            return
        service = name if limit == MAX_PENDING_PER_SERVICE else ""
        value = (self._limits.max_pending_per_service if service
                 else self._limits.max_connections)
        if result.reason == "limit-reached":
            episode = self._episodes.refused(limit, service, value, now)
            if episode is not None:
                proxy_log.limit_reached(episode)
            return
        episode = self._episodes.admitted(limit, service)
        if episode is not None:
            episode.refused = result.failures
            proxy_log.limit_cleared(episode, now)
