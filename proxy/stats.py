"""Connection counters of the proxy, per service."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ServiceCounters:
    """Envoy-like counters for one service (``upstream_cx_*`` in Envoy's names)."""

    connections_total: int = 0  # accepted for this service
    connections_active: int = 0  # currently relaying
    connect_failures: int = 0  # upstream connect attempts that failed or timed out
    rejected: int = 0  # closed at once: no endpoint, or every attempt failed
    bytes_to_upstream: int = 0
    bytes_to_client: int = 0
    ejections: int = 0  # outlier ejections so far (Envoy's ejections_enforced_total)
    ejections_active: int = 0  # endpoints out of the pool now (Envoy's ejections_active)
    # Of the bytes above, those the native engine moved with splice(2), in the
    # kernel; the rest were copied through user space (the Python relay copies all).
    bytes_spliced_to_upstream: int = 0
    bytes_spliced_to_client: int = 0
    # Connect phase (proxy/limits.py): connecting to an endpoint now (Envoy's
    # upstream_rq_pending_active), and refused over --max-pending-per-service.
    pending_active: int = 0
    pending_overflow: int = 0

    # Bound methods handed to the Python relay as per-chunk callbacks (hot path).
    def count_to_upstream(self, n: int) -> None:
        self.bytes_to_upstream += n

    def count_to_client(self, n: int) -> None:
        self.bytes_to_client += n

    def count_closed(self) -> None:
        self.connections_active -= 1


class ProxyStats:
    """All counters of one proxy; ``unrouted`` counts connections to no known VIP,
    ``overflow`` those refused over --max-connections (Envoy's downstream_cx_overflow)."""

    def __init__(self) -> None:
        self.services: dict[str, ServiceCounters] = {}
        self.unrouted = 0
        self.overflow = 0

    def of(self, service: str) -> ServiceCounters:
        counters = self.services.get(service)
        if counters is None:
            counters = self.services[service] = ServiceCounters()
        return counters

    def snapshot(self) -> dict[str, object]:
        return {
            "unrouted": self.unrouted,
            "overflow": self.overflow,
            "services": {name: asdict(c) for name, c in sorted(self.services.items())},
        }
