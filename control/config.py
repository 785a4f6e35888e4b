"""The agent's options: one typed object, built from flags and CONSULATE_* variables."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_VIP_CIDR = "240.0.0.0/4"  # Consul's virtual-IP range, never routed on the internet
DEFAULT_MARK = 0xC0A  # marks the proxy's upstream sockets so iptables never redirects them


RELAYS = ("auto", "native", "python")


class ConfigError(ValueError):
    """A flag or variable has a value the agent cannot use; the message names it."""


def parse_hostport(flag: str, text: str) -> tuple[str, int]:
    """``HOST:PORT`` as given to ``flag``, with both parts checked."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
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
    relay: str = "auto"  # native when the extension is built and usable, else python

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
        if not self.domain.endswith("."):
            self.domain += "."
        if self.relay not in RELAYS:
            raise ConfigError(f"--relay {self.relay!r} is unknown: use one of {', '.join(RELAYS)}")
        if self.connect_timeout <= 0:
            raise ConfigError(f"--connect-timeout {self.connect_timeout} must be above 0")
