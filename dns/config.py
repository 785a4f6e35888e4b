"""The DNS responder's options: one typed object, defaults from Consul's ``dns_config``.

The agent builds it from its flags (control/config.py checks every value and names
the flag in its errors); the responder takes it as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

A_MODES = ("vip", "instances")
DEFAULT_UDP_MAX = 1232  # RFC 9715 / DNS Flag Day 2020: no IP fragmentation on common paths


@dataclass(frozen=True)
class SoaTimers:
    """The SOA fields a resolver acts on; Consul's ``dns_config.soa`` defaults.

    ``min_ttl`` is the negative-caching TTL (RFC 2308 section 4): it is both the SOA
    MINIMUM field and the TTL of the SOA record sent with NXDOMAIN and NODATA, so a
    resolver caches "no such name" for exactly that long. 0 (Consul's default) means
    a service that appears is seen by the next query.
    """

    refresh: int = 3600
    retry: int = 600
    expire: int = 86400
    min_ttl: int = 0


class TtlPolicy:
    """Consul's ``service_ttl``: per-service answer TTLs from exact names and ``prefix*``.

    An exact name wins, then the longest matching prefix pattern (``*`` alone is the
    empty prefix, so it is the catch-all), then ``default``. Names match
    case-insensitively, as DNS names do.
    """

    def __init__(self, rules: Mapping[str, int] | None = None, default: int = 0) -> None:
        self._exact: dict[str, int] = {}
        prefixes: list[tuple[str, int]] = []
        for pattern, ttl in (rules or {}).items():
            if pattern.endswith("*"):
                prefixes.append((pattern[:-1].lower(), ttl))
            else:
                self._exact[pattern.lower()] = ttl
        self._prefixes = sorted(prefixes, key=lambda rule: len(rule[0]), reverse=True)
        self._default = default

    def ttl_for(self, service: str) -> int:
        name = service.lower()
        found = self._exact.get(name)
        if found is not None:
            return found
        for prefix, ttl in self._prefixes:
            if name.startswith(prefix):
                return ttl
        return self._default


@dataclass(frozen=True)
class DnsConfig:
    """What the responder serves and how.

    ``a_records`` is ``vip`` (mesh mode: a service name answers its virtual IP, so
    connections go through the proxy) or ``instances`` (plain Consul: the addresses
    of the instances). ``node``/``node_address``/``node_meta`` describe the agent's
    own node, the one node whose address and metadata this agent knows for sure.
    """

    domain: str = "consul."
    alt_domain: str | None = None
    datacenter: str = "dc1"
    node: str = "localhost"
    node_address: str = "127.0.0.1"
    node_meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    a_records: str = "vip"
    udp_max: int = DEFAULT_UDP_MAX
    service_ttl: TtlPolicy = field(default_factory=TtlPolicy)
    node_ttl: int = 0
    soa: SoaTimers = field(default_factory=SoaTimers)
    recursors: tuple[tuple[str, int], ...] = ()
    recursor_timeout: float = 2.0
    rate_limit: float = 0.0  # UDP answers per second per client address; 0: no limit

    @property
    def zones(self) -> tuple[str, ...]:
        """The domains answered, primary first, each ending with a dot."""
        return (self.domain,) if not self.alt_domain else (self.domain, self.alt_domain)
