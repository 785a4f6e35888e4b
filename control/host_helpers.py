"""Consulate's host helpers: what to give dockerd and `docker run`, and the iptables
rules the agent would install, printed rather than applied."""

from __future__ import annotations

import argparse
import ipaddress
import subprocess
from typing import Any

from consulate.control.config import (
    DEFAULT_MARK,
    DEFAULT_VIP_CIDR,
    AgentConfig,
    ConfigError,
    parse_mark,
)
from consulate.proxy import iptables
from consulate.proxy.sklookup import REDIRECT, SK_LOOKUP


def docker_dns_options(bridge_ip: str, domain: str) -> str:
    """The options that make containers resolve through the agent on the bridge."""
    try:
        ipaddress.IPv4Address(bridge_ip)
    except ValueError:
        raise ConfigError(f"--bridge-ip {bridge_ip!r} is not an IPv4 address") from None
    return f"--dns {bridge_ip} --dns-search service.{domain.strip('.')}"


def bridge_address(device: str = "docker0") -> str:
    """The IPv4 address of Docker's bridge on this host."""
    done = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", device],
                          capture_output=True, text=True)
    fields = done.stdout.split()
    if done.returncode != 0 or "inet" not in fields:
        raise ConfigError(f"no {device} bridge with an IPv4 address here: start dockerd, or "
                          "pass --bridge-ip")
    return fields[fields.index("inet") + 1].split("/")[0]


def _cmd_docker_opts(args: argparse.Namespace) -> int:
    print(docker_dns_options(args.bridge_ip or bridge_address(), args.domain))
    return 0


def redirect_rules_text(vip_cidr: str, proxy_port: int, mark: str,
                        ambassador: iptables.AmbassadorRedirect | None = None, *,
                        tcp_intercept: str = REDIRECT) -> str:
    """The iptables-restore transaction the agent applies on a host without its rules
    (with ``tcp_intercept`` sk-lookup, BPF brings TCP to the proxy: no TCP rules)."""
    try:
        ipaddress.IPv4Network(vip_cidr)
    except ValueError as exc:
        raise ConfigError(f"--vip-cidr {vip_cidr!r} is not an IPv4 network: {exc}") from None
    if not 1 <= proxy_port <= 65535:
        raise ConfigError(f"--proxy-port {proxy_port} must be from 1 to 65535")
    return iptables.install_script(
        iptables.RedirectRules(vip_cidr, proxy_port, parse_mark(mark), ambassador=ambassador,
                               tcp=tcp_intercept == REDIRECT), "")


def _cmd_iptables(args: argparse.Namespace) -> int:
    ambassador = AgentConfig(proxy_addr=("0.0.0.0", args.proxy_port)).ambassador_redirect(
        args.bridge_ip or bridge_address()) if args.ambassador else None
    print(redirect_rules_text(args.vip_cidr, args.proxy_port, args.mark, ambassador,
                              tcp_intercept=args.tcp_intercept), end="")
    return 0


def add_host_helper_parsers(sub: Any) -> None:
    p = sub.add_parser("docker-opts", help="print the DNS options for dockerd and docker run "
                       "(--dns <bridge ip> --dns-search service.consul)")
    p.add_argument("--bridge-ip", default="", help="the agent's DNS address on the container "
                   "bridge (default: docker0's address); run the agent with --dns-addr IP:53")
    p.add_argument("--domain", default="consul.", help="the agent's DNS domain")
    p.set_defaults(func=_cmd_docker_opts)
    p = sub.add_parser("iptables", help="print the iptables rules the agent installs "
                       "(an iptables-restore transaction), without applying them")
    p.add_argument("--print", action="store_true", required=True, dest="print_rules",
                   help="print them (nothing else is offered: the agent applies them)")
    p.add_argument("--vip-cidr", default=DEFAULT_VIP_CIDR)
    p.add_argument("--proxy-port", type=int, default=10000)
    p.add_argument("--mark", default=hex(DEFAULT_MARK))
    p.add_argument("--tcp-intercept", choices=(REDIRECT, SK_LOOKUP), default=REDIRECT,
                   help="the agent's --tcp-intercept in effect (Stats.iptables.tcp_intercept "
                   "of /v1/agent/self): with sk-lookup it installs no TCP rule (default "
                   "redirect: the whole set)")
    p.add_argument("--ambassador", action="store_true", help="with the agent's ambassador omni "
                   "mode rule (agent defaults for its listening ports)")
    p.add_argument("--bridge-ip", default="", help="the bridge address omni mode takes "
                   "(default: docker0's address)")
    p.set_defaults(func=_cmd_iptables)
