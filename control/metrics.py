"""The agent's ``/metrics``: Prometheus text format with Envoy-like names.

Nothing here counts: the proxy, the native engine, the DNS server and the watch
hub keep their own counters, and a custom collector reads them at scrape time
(``Scrape`` is one reading of every source), so a number is never counted twice
nor drifts from ``/v1/agent/self``. ``families`` turns one reading into metric
families, a pure function tested without sockets; the route serves them in the
format the scraper asks for (text 0.0.4 by default, OpenMetrics on request).

Per-service families carry the label ``consulate_cluster`` (Envoy's
``envoy_cluster_name``): the service name. README.md lists every name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from dnslib import RCODE
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

PREFIX = "consulate_"
CLUSTER = "consulate_cluster"


@dataclass(frozen=True)
class _ServiceMetric:
    """One field of a service's proxy counters (``ServiceCounters``) and its metric."""

    field: str
    name: str
    help: str
    counter: bool
    # Optional fields appear once the proxy's counters carry them (a relay or a
    # feature that does not count them yet leaves the family out, not at zero).
    optional: bool = False


_SERVICE_METRICS = (
    _ServiceMetric("connections_total", "downstream_cx",
                   "Connections accepted for the service (to its VIP).", True),
    _ServiceMetric("connections_active", "downstream_cx_active",
                   "Connections of the service being relayed now.", False),
    _ServiceMetric("connect_failures", "upstream_cx_connect_fail",
                   "Connect attempts to an endpoint that failed or timed out.", True),
    _ServiceMetric("rejected", "upstream_cx_none_healthy",
                   "Connections closed at once: no endpoint, or every attempt failed.", True),
    _ServiceMetric("bytes_to_upstream", "upstream_cx_tx_bytes",
                   "Bytes relayed from clients to endpoints (native relay: when a "
                   "connection ends).", True),
    _ServiceMetric("bytes_to_client", "upstream_cx_rx_bytes",
                   "Bytes relayed from endpoints to clients (native relay: when a "
                   "connection ends).", True),
    _ServiceMetric("ejections", "outlier_detection_ejections",
                   "Endpoints ejected by outlier detection.", True, optional=True),
    _ServiceMetric("ejections_active", "outlier_detection_ejections_active",
                   "Endpoints ejected now.", False, optional=True),
    _ServiceMetric("pending_active", "upstream_rq_pending_active",
                   "Connections of the service connecting to an endpoint now.", False,
                   optional=True),
    _ServiceMetric("pending_overflow", "upstream_rq_pending_overflow",
                   "Connections refused (reset) over --max-pending-per-service.", True,
                   optional=True),
)

# Bytes moved by splice(2), per direction, when the relay counts them per service;
# the rest of upstream_cx_{tx,rx}_bytes was copied through user space.
_SPLICED_FIELDS = (("tx", "bytes_to_upstream", "bytes_spliced_to_upstream"),
                   ("rx", "bytes_to_client", "bytes_spliced_to_client"))


@dataclass(frozen=True)
class Scrape:
    """One reading of every counter source, taken when Prometheus scrapes."""

    proxy: Mapping[str, Any]  # TransparentProxy.stats_snapshot()
    relay: str  # "native" | "python": the Python relay never splices
    endpoints: Mapping[str, int]  # service -> endpoints in the route table
    route_version: int
    dns_rcodes: Sequence[int]  # replies sent, indexed by RCODE
    watch: Mapping[str, int]  # WatchHub.stats()
    dns_rate_limited: int | None = None  # queries over --dns-rate-limit; None: it is off


def families(scrape: Scrape) -> list[Metric]:
    """The metric families of one reading, in a stable order."""
    services: Mapping[str, Mapping[str, int]] = scrape.proxy.get("services", {})
    clusters = sorted(set(services) | set(scrape.endpoints))
    out: list[Metric] = []
    for spec in _SERVICE_METRICS:
        if spec.optional and not any(spec.field in c for c in services.values()):
            continue
        family = _family(spec.name, spec.help, spec.counter, [CLUSTER])
        for name in clusters:
            family.add_metric([name], services.get(name, {}).get(spec.field, 0))
        out.append(family)
    relay_bytes = _relay_bytes(scrape, clusters)
    if relay_bytes.samples:
        out.append(relay_bytes)
    no_route = _family("downstream_cx_no_route", "Connections to an address that is no "
                       "service's VIP (reset at once).", True)
    no_route.add_metric([], int(scrape.proxy.get("unrouted", 0)))
    out.append(no_route)
    if "overflow" in scrape.proxy:
        overflow = _family("downstream_cx_overflow", "Connections refused (reset) over "
                           "--max-connections.", True)
        overflow.add_metric([], int(scrape.proxy["overflow"]))
        out.append(overflow)
    membership = _family("membership_endpoints", "Endpoints of the service in the route table.",
                         False, [CLUSTER])
    for name in clusters:
        membership.add_metric([name], scrape.endpoints.get(name, 0))
    out.append(membership)
    version = _family("route_table_version", "Changes applied to the route table.", False)
    version.add_metric([], scrape.route_version)
    out.append(version)
    out.append(_dns_responses(scrape.dns_rcodes))
    if scrape.dns_rate_limited is not None:
        limited = _family("dns_rate_limited", "DNS queries over --dns-rate-limit (dropped, "
                          "or answered with TC=1 every second one).", True)
        limited.add_metric([], scrape.dns_rate_limited)
        out.append(limited)
    for key, name, help in (
        ("services", "watch_services", "Services watched by blocking queries or streams."),
        ("waiters", "watch_blocking_queries", "Blocking queries (long polls) waiting."),
        ("streams", "watch_streams", "Event streams open."),
    ):
        gauge = _family(name, help, False)
        gauge.add_metric([], scrape.watch.get(key, 0))
        out.append(gauge)
    return out


def _family(name: str, help: str, counter: bool,
            labels: Sequence[str] = ()) -> CounterMetricFamily | GaugeMetricFamily:
    kind = CounterMetricFamily if counter else GaugeMetricFamily
    return kind(PREFIX + name, help, labels=list(labels))


def _relay_bytes(scrape: Scrape, clusters: Iterable[str]) -> Metric:
    family = _family("relay_bytes", "Bytes relayed per direction (tx: to endpoints, rx: to "
                     "clients) and method: splice (splice(2), never in user space) or copy.",
                     True, [CLUSTER, "direction", "method"])
    services: Mapping[str, Mapping[str, int]] = scrape.proxy.get("services", {})
    for name in clusters:
        counters = services.get(name, {})
        for direction, total_field, spliced_field in _SPLICED_FIELDS:
            total = counters.get(total_field, 0)
            if spliced_field in counters:
                spliced = counters[spliced_field]
            elif scrape.relay == "python":
                spliced = 0
            else:
                continue  # this engine does not split its byte counts per service
            family.add_metric([name, direction, "splice"], spliced)
            family.add_metric([name, direction, "copy"], total - spliced)
    return family


def _dns_responses(rcodes: Sequence[int]) -> Metric:
    """Every RCODE of RFC 1035/2136 at its count (zeros too, so rates start at once);
    any other code only once sent, by number."""
    family = _family("dns_responses", "DNS replies sent, by response code.", True, ["rcode"])
    for code, count in enumerate(rcodes):
        name = RCODE.forward.get(code)
        if name is not None or count:
            family.add_metric([name or str(code)], count)
    return family


class AgentCollector(Collector):
    """Reads the agent's live counters through ``read`` at every scrape."""

    def __init__(self, read: Callable[[], Scrape]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield from families(self._read())


def add_routes(app: web.Application, read: Callable[[], Scrape]) -> None:
    """``GET /metrics``, and Consul's ``/v1/agent/metrics?format=prometheus`` (the
    only format served there)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(read))

    async def metrics(request: web.Request) -> web.Response:
        if request.path.startswith("/v1/") and request.query.get("format") != "prometheus":
            raise web.HTTPBadRequest(text="this agent serves its metrics in Prometheus "
                                          "format only: ask for ?format=prometheus")
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encode(registry))
        response.headers["Content-Type"] = content_type
        return response

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/agent/metrics", metrics)
