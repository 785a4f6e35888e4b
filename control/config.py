"""The agent's options: one typed object, built from flags and CONSULATE_* variables."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from consulate.control.registry.location import BadLocation, parse_location
from consulate.control.service_definition import InvalidDefinition, parse_duration
from consulate.dns.config import A_MODES, DEFAULT_UDP_MAX, DnsConfig, SoaTimers, TtlPolicy
from consulate.dns.wire import MIN_UDP
from consulate.proxy.iptables import AmbassadorRedirect
from consulate.proxy.limits import ConnectionLimits, LimitError, default_max_connections
from consulate.proxy.sklookup import AUTO, INTERCEPTS

DEFAULT_VIP_CIDR = "240.0.0.0/4"  # Consul's virtual-IP range, never routed on the internet
DEFAULT_MARK = 0xC0A  # marks the proxy's upstream sockets so iptables never redirects them


RELAYS = ("auto", "native", "python")
MAX_UDP_LIMIT = 4096  # RFC 6891 6.2.5's suggested ceiling; above it fragmentation is certain
MAX_TTL = 2**31 - 1  # RFC 2181 8: TTLs are unsigned 31-bit
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
_TTL_PATTERN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]*\*?|\*)$")
_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
TXT_STRING_MAX = 255  # RFC 1035 3.3: one TXT character-string
MULTIPORT_MAX = 15  # ports one iptables multiport match takes


class ConfigError(ValueError):
    """A flag or variable has a value the agent cannot use; the message names it."""


def is_decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def parse_hostport(flag: str, text: str) -> tuple[str, int]:
    """``HOST:PORT`` as given to ``flag``, with both parts checked."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not is_decimal(port_text) or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{flag} {text!r} is not HOST:PORT (for example 127.0.0.1:8500)")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: {host!r} is not an IPv4 address") from None
    return host, int(port_text)


def parse_mark(text: str) -> int:
    """A netfilter mark such as ``0xc0a`` or ``3082``."""
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 < value < 2**32:
        raise ConfigError(f"--mark {text!r} must be a number from 1 to 0xffffffff")
    return value


def parse_recursor(text: str) -> tuple[str, int]:
    """``--recursor ADDR[:PORT]``: an upstream resolver, port 53 unless given."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, "53"
    try:
        ipaddress.IPv4Address(host)
        port = int(port_text) if is_decimal(port_text) else 0
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(f"--recursor {text!r} is not ADDR[:PORT] with an IPv4 address "
                          "(for example 127.0.0.53 or 10.0.0.2:5353)")
    return host, port


def parse_seconds(flag: str, text: str) -> int:
    """Whole seconds, as a number (``30``) or a Go duration (``30s``, ``1m``)."""
    if is_decimal(text):
        return int(text)
    try:
        seconds = parse_duration(text)
    except InvalidDefinition:
        seconds = -1.0
    if seconds < 0 or seconds != int(seconds):
        raise ConfigError(f"{flag} {text!r} is not a number of whole seconds "
                          "(for example 30 or 30s)")
    return int(seconds)


def parse_positive_seconds(flag: str, text: str) -> float:
    """A duration longer than zero, as seconds (``2.5``) or Go's form (``10s``, ``1m``)."""
    try:
        seconds = float(text) if is_decimal(text.replace(".", "", 1)) else parse_duration(text)
    except InvalidDefinition:
        seconds = 0.0
    if seconds <= 0:
        raise ConfigError(f"{flag} {text!r} is not a duration longer than zero "
                          "(for example 10s or 2.5)")
    return seconds


def parse_service_ttl(text: str) -> tuple[str, int]:
    """``--service-ttl NAME=SECONDS``: NAME is a service, a ``prefix*`` or ``*``."""
    pattern, sep, value = text.partition("=")
    if not sep or not _TTL_PATTERN.match(pattern):
        raise ConfigError(f"--service-ttl {text!r} is not NAME=SECONDS, where NAME is a "
                          "service name, a prefix ending with '*', or '*' (for example "
                          "web=30 or api-*=5s)")
    return pattern, parse_seconds(f"--service-ttl {pattern}", value)


def parse_node_meta(text: str) -> tuple[str, str]:
    """``--node-meta KEY=VALUE``: one pair of this node's metadata (DNS TXT records)."""
    key, sep, value = text.partition("=")
    if not sep or not _META_KEY.match(key):
        raise ConfigError(f"--node-meta {text!r} is not KEY=VALUE with a key of up to 128 "
                          "letters, digits, '-' or '_'")
    if len(text.encode()) > TXT_STRING_MAX:
        raise ConfigError(f"--node-meta {key}=...: the pair is {len(text.encode())} bytes; "
                          f"a DNS TXT string holds at most {TXT_STRING_MAX}")
    return key, value


def parse_count(flag: str, text: str, *, auto: bool = False) -> int:
    """A whole number of 1 or more (``auto``: also the word auto, returned as 0)."""
    if auto and text.strip().lower() == "auto":
        return 0
    value = int(text) if is_decimal(text.strip()) else 0
    if value < 1:
        either = " or auto" if auto else ""
        raise ConfigError(f"{flag} {text!r} must be a whole number of 1 or more{either} "
                          "(for example 1024)")
    return value


def parse_rate(flag: str, text: str) -> float:
    """A rate per second of 0 (off) or more, such as ``100`` or ``12.5``."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ConfigError(f"{flag} {text!r} must be a number of 0 (off) or more, per second "
                          "(for example 100)")
    return value


def _check_domain(flag: str, domain: str) -> str:
    """``domain`` lower-cased and ending with a dot, if it is a usable DNS name."""
    name = domain.lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 240 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ConfigError(f"{flag} {domain!r} is not a DNS domain: use labels of letters, "
                          "digits, '-' or '_' separated by dots (for example consul.)")
    return name + "."


@dataclass
class AgentConfig:
    """Everything ``consulate agent`` needs; defaults follow Consul and Ambassadord."""

    node: str = field(default_factory=socket.gethostname)
    datacenter: str = "dc1"
    data_dir: Path = Path("/var/lib/consulate")
    advertise: str = "127.0.0.1"
    http_addr: tuple[str, int] = ("127.0.0.1", 8500)
    dns_addrs: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 8600)])
    domain: str = "consul."
    proxy_addr: tuple[str, int] = ("0.0.0.0", 10000)
    vip_cidr: str = DEFAULT_VIP_CIDR
    mark: int = DEFAULT_MARK
    iptables: bool = True
    connect_timeout: float = 2.0
    base_ejection_time: float = 30.0  # outlier ejection, x the endpoint's ejections (Envoy)
    relay: str = "auto"  # native when the extension is built and usable, else python
    tcp_intercept: str = AUTO  # sk-lookup when the kernel allows it, else redirect
    max_connections: int = 0  # relayed at once; 0: derived from RLIMIT_NOFILE (HAProxy)
    max_pending_per_service: int = 1024  # connecting at once per service (Envoy's default)
    dns_rate_limit: float = 0.0  # UDP answers per second per client address; 0: off
    registry: str = "embedded"  # or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]
    token: str = ""  # needed by writes to the HTTP API; required off loopback
    tls_cert: str = ""  # PEM certificate chain: the HTTP API serves https with it
    tls_key: str = ""  # its PEM private key
    tls_ca: str = ""  # PEM CA: clients of the API must present a certificate it signed
    ca_file: str = ""  # PEM CA checking an https --registry/--join agent ("": system CAs)
    client_cert: str = ""  # PEM client certificate for that agent (when it has --tls-ca)
    client_key: str = ""  # its PEM private key
    http_max_conns_per_client: int = 200  # Consul's limits.http_max_conns_per_client; 0: none
    alt_domain: str = ""
    dns_a: str = "vip"
    udp_max: int = DEFAULT_UDP_MAX
    recursors: list[tuple[str, int]] = field(default_factory=list)
    recursor_timeout: float = 2.0
    service_ttls: dict[str, int] = field(default_factory=dict)
    node_ttl: int = 0
    soa: SoaTimers = field(default_factory=SoaTimers)
    node_meta: dict[str, str] = field(default_factory=dict)
    registrator: bool = True  # run the registrator when a Docker socket is there
    docker_host: str = ""  # "": DOCKER_HOST, else unix:///var/run/docker.sock
    registrator_flags: str = ""  # registrator options, as `consulate registrator` takes them
    configurator: str = ""  # a configurator to run here: `consulate configurator`'s arguments
    enable_script_checks: bool = False  # run Args health checks (Consul's flag)
    liveness_ttl: float = 10.0  # what this agent registers leaves the registry after it
    scheduler: bool = False  # join the scheduler: a node, and a leader candidate
    scheduler_rpc_addr: str = ""  # HOST:PORT of the scheduler's duplex RPC; "": unix socket
    scheduler_exec_netns: str = ""  # network namespace the exec driver runs tasks in
    ambassador: bool = False  # omni mode: containers' BACKEND_<port> routed (Ambassadord)
    ambassador_addr: tuple[str, int] = ("0.0.0.0", 10001)
    bridge_ip: str = ""  # the container bridge's address omni mode takes; "": docker0's
    user: str = ""  # run as this user (HAProxy's user), with only the capabilities needed
    group: str = ""  # and this group; "": the user's own (HAProxy's group)
    keep_capabilities: bool = False  # do not drop the capabilities the agent does not use

    @property
    def http_beyond_loopback(self) -> bool:
        """The HTTP API takes connections from containers or other hosts."""
        return not ipaddress.IPv4Address(self.http_addr[0]).is_loopback

    def validate(self) -> None:
        try:
            ipaddress.IPv4Network(self.vip_cidr)
        except ValueError as exc:
            raise ConfigError(
                f"--vip-cidr {self.vip_cidr!r} is not an IPv4 network: {exc}"
            ) from None
        try:
            ipaddress.IPv4Address(self.advertise)
        except ValueError:
            raise ConfigError(f"--advertise {self.advertise!r} is not an IPv4 address") from None
        self._validate_dns()
        if not self.token and self.http_beyond_loopback:
            raise ConfigError(
                f"--http-addr {self.http_addr[0]}:{self.http_addr[1]} listens beyond this "
                "host: set --token (or CONSULATE_TOKEN) so that writes to the API and KV "
                "reads need it")
        try:
            location = parse_location(self.registry)
        except BadLocation as exc:
            raise ConfigError(str(exc)) from None
        given = [flag for flag, path in (("--ca-file", self.ca_file), ("--client-cert",
                 self.client_cert), ("--client-key", self.client_key)) if path]
        if given and not location.https:
            raise ConfigError(f"{given[0]} is for an agent reached over TLS: use it with "
                              "--join https://HOST:PORT or --registry https://HOST:PORT "
                              f"(the registry is {self.registry})")
        if self.tcp_intercept not in INTERCEPTS:
            raise ConfigError(f"--tcp-intercept {self.tcp_intercept!r} is unknown: use one of "
                              f"{', '.join(INTERCEPTS)}")
        if self.relay not in RELAYS:
            raise ConfigError(f"--relay {self.relay!r} is unknown: use one of {', '.join(RELAYS)}")
        if self.connect_timeout <= 0:
            raise ConfigError(f"--connect-timeout {self.connect_timeout} must be above 0")
        self.connection_limits()  # raises for a bad value
        if not 0 <= self.dns_rate_limit < float("inf"):
            raise ConfigError(f"--dns-rate-limit {self.dns_rate_limit} must be 0 (off) or "
                              "more answers per second per client address")
        if not self.base_ejection_time > 0:
            raise ConfigError(f"--base-ejection-time {self.base_ejection_time} must be above 0 "
                              "(seconds an endpoint stays ejected the first time)")
        if self.http_max_conns_per_client < 0:
            raise ConfigError(f"--http-max-conns-per-client {self.http_max_conns_per_client} "
                              "must be 0 (no limit) or more (Consul's default is 200)")
        if self.group and not self.user:
            raise ConfigError(f"--group {self.group!r} needs --user: give the user to run as")
        if self.keep_capabilities and self.user:
            raise ConfigError(f"--keep-capabilities and --user {self.user!r}: a user other "
                              "than root keeps only the capabilities the agent needs; give "
                              "one of them")

    def _validate_dns(self) -> None:
        self.domain = _check_domain("--domain", self.domain)
        if self.alt_domain:
            self.alt_domain = _check_domain("--alt-domain", self.alt_domain)
            if self.alt_domain == self.domain:
                raise ConfigError(f"--alt-domain {self.alt_domain!r} is the same as --domain: "
                                  "give another domain or leave it out")
        if not _DNS_LABEL.match(self.datacenter):
            raise ConfigError(f"--datacenter {self.datacenter!r} must be one DNS label: "
                              "lowercase letters, digits, '-' or '_' (for example dc1)")
        if self.dns_a not in A_MODES:
            raise ConfigError(f"--dns-a {self.dns_a!r} is unknown: use vip (answer a "
                              "service's virtual IP) or instances (its instance addresses)")
        if not MIN_UDP <= self.udp_max <= MAX_UDP_LIMIT:
            raise ConfigError(f"--udp-max {self.udp_max} must be from {MIN_UDP} to "
                              f"{MAX_UDP_LIMIT} bytes (default {DEFAULT_UDP_MAX})")
        if self.recursor_timeout <= 0:
            raise ConfigError(f"--recursor-timeout {self.recursor_timeout} must be above 0")
        ttls = [(f"--service-ttl {name}", ttl) for name, ttl in self.service_ttls.items()]
        ttls += [("--node-ttl", self.node_ttl), ("--dns-soa-refresh", self.soa.refresh),
                 ("--dns-soa-retry", self.soa.retry), ("--dns-soa-expire", self.soa.expire),
                 ("--dns-soa-min-ttl", self.soa.min_ttl)]
        for flag, seconds in ttls:
            if not 0 <= seconds <= MAX_TTL:
                raise ConfigError(f"{flag} {seconds} must be from 0 to {MAX_TTL} seconds")

    def ambassador_redirect(self, bridge_ip: str) -> AmbassadorRedirect:
        """Omni mode's iptables rule: every port of ``bridge_ip`` but this agent's own."""
        keep = {self.http_addr[1], self.proxy_addr[1], self.ambassador_addr[1],
                *(port for _, port in self.dns_addrs)}
        if len(keep) > MULTIPORT_MAX:
            raise ConfigError(f"--ambassador: the agent listens on {len(keep)} ports "
                              f"({','.join(map(str, sorted(keep)))}); iptables' multiport "
                              f"match keeps at most {MULTIPORT_MAX} out of omni mode: use "
                              "fewer --dns-addr ports")
        try:
            ipaddress.IPv4Address(bridge_ip)
        except ValueError:
            raise ConfigError(f"--bridge-ip {bridge_ip!r} is not an IPv4 address") from None
        return AmbassadorRedirect(bridge_ip, self.ambassador_addr[1], tuple(sorted(keep)))

    def connection_limits(self) -> ConnectionLimits:
        """The proxy's limits, with --max-connections derived when not given."""
        try:
            return ConnectionLimits(self.max_connections or default_max_connections(),
                                    self.max_pending_per_service)
        except LimitError as exc:
            raise ConfigError(str(exc)) from None

    def dns_config(self) -> DnsConfig:
        """The responder's options (call after ``validate``)."""
        return DnsConfig(
            domain=self.domain, alt_domain=self.alt_domain or None,
            datacenter=self.datacenter, node=self.node, node_address=self.advertise,
            node_meta=dict(self.node_meta), a_records=self.dns_a, udp_max=self.udp_max,
            service_ttl=TtlPolicy(self.service_ttls), node_ttl=self.node_ttl, soa=self.soa,
            recursors=tuple(self.recursors), recursor_timeout=self.recursor_timeout,
            rate_limit=self.dns_rate_limit,
        )
