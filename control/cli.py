"""``consulate``: the command line. A thin shell over the modules; only ``main`` exits.

Every agent flag can also be set with an environment variable named
``CONSULATE_<FLAG>`` (``--http-addr`` -> ``CONSULATE_HTTP_ADDR``); ``--help``
shows each flag's variable and default.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from consulate.control.agent import VERSION, Agent, cleanup
from consulate.control.ambassador_cli import add_ambassador_parser
from consulate.control.cli_examples import add_examples
from consulate.control.cli_inspect import add_json_flag, cmd_routes, cmd_services, cmd_status
from consulate.control.client import AgentClient, ApiError, client_for
from consulate.control.completion import add_completion_parser
from consulate.control.config import (
    AgentConfig,
    ConfigError,
    is_decimal,
    parse_count,
    parse_hostport,
    parse_mark,
    parse_node_meta,
    parse_positive_seconds,
    parse_rate,
    parse_recursor,
    parse_seconds,
    parse_service_ttl,
)
from consulate.control.configurator.command import add_configurator_parser
from consulate.control.host_helpers import add_host_helper_parsers
from consulate.control.lab_cli import add_lab_parser
from consulate.control.privileges import PrivilegeError, drop_for_agent
from consulate.control.registrator.cli import add_registrator_parser
from consulate.control.scheduler.cli import add_scheduler_parsers
from consulate.control.service_definition import InvalidDefinition, parse_duration
from consulate.dns.config import SoaTimers
from consulate.proxy.iptables import IptablesError
from consulate.proxy.localroute import LocalRouteError

log = logging.getLogger("consulate")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def _env_flag(parser: argparse.ArgumentParser, flag: str, default: str, help: str,
              env: str = "", **kwargs: Any) -> None:
    """Add ``flag`` whose default comes from CONSULATE_<FLAG> (or ``env``) when set."""
    env = env or _env_name(flag)
    parser.add_argument(flag, default=os.environ.get(env, default),
                        help=f"{help} (env {env}, default {default})", **kwargs)


def _env_name(flag: str) -> str:
    return "CONSULATE_" + flag.lstrip("-").upper().replace("-", "_")


def _env_list_flag(parser: argparse.ArgumentParser, flag: str, metavar: str,
                   help: str) -> None:
    """Add a repeatable ``flag``; without it, CONSULATE_<FLAG> gives a comma-separated list.

    The default stays None (argparse would append to a list default in place), and
    ``_listed`` picks the flags or the variable.
    """
    parser.add_argument(flag, action="append", metavar=metavar,
                        help=f"{help} (repeatable; env {_env_name(flag)}, comma-separated)")


def _listed(values: list[str] | None, flag: str) -> list[str]:
    if values is not None:
        return values
    return [part for part in os.environ.get(_env_name(flag), "").split(",") if part]


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def _add_agent(sub: Any) -> None:
    p = sub.add_parser("agent", help="run the mesh agent on this host (foreground)",
                       description="Run the per-host mesh agent: registry, route table, "
                       "transparent proxy, DNS and HTTP API. SIGINT/SIGTERM remove every "
                       "iptables rule and chain it installed.")
    defaults = AgentConfig()
    _env_flag(p, "--node", defaults.node, "this node's name")
    _env_flag(p, "--datacenter", defaults.datacenter, "datacenter name")
    _env_flag(p, "--data-dir", str(defaults.data_dir), "where the registry and VIPs persist")
    _env_flag(p, "--registry", defaults.registry, "where the registry lives: embedded (in "
              "--data-dir), etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (shared by many hosts), "
              "consul://HOST:PORT (a Consul agent) or http(s)://HOST:PORT (another agent; "
              "https: see --ca-file)")
    _env_flag(p, "--join", "", "use the embedded registry of the agent at HOST:PORT (its "
              "HTTP API; the same as --registry http://HOST:PORT), or https://HOST:PORT for "
              "one serving TLS (see --ca-file)")
    _env_flag(p, "--advertise", defaults.advertise, "this host's address for other hosts")
    _env_flag(p, "--token", "", "token every write to the HTTP API must carry (X-Consul-Token "
              "or Authorization: Bearer); required when --http-addr is not on loopback, "
              "where KV reads need it too")
    _env_flag(p, "--tls-cert", "", "PEM certificate (chain) the HTTP API serves https with "
              "(Consul's cert_file); needs --tls-key")
    _env_flag(p, "--tls-key", "", "PEM private key of --tls-cert (Consul's key_file)")
    _env_flag(p, "--tls-ca", "", "PEM CA certificate: every client of the HTTP API must "
              "present a certificate it signed (Consul's ca_file with verify_incoming)")
    _env_flag(p, "--ca-file", "", "PEM CA certificate to check the certificate of an https "
              "--join/--registry agent with (default: the system's CAs)",
              env="CONSULATE_CACERT")
    _env_flag(p, "--client-cert", "", "PEM client certificate for an https --join/--registry "
              "agent that verifies clients (its --tls-ca)")
    _env_flag(p, "--client-key", "", "PEM private key of --client-cert")
    _env_flag(p, "--http-max-conns-per-client", str(AgentConfig.http_max_conns_per_client),
              "connections one client address may hold open to the HTTP API (each blocking "
              "query or event stream holds one); more are answered 429; 0: no limit "
              "(Consul's limits.http_max_conns_per_client)", type=int)
    _env_flag(p, "--http-addr", "127.0.0.1:8500", "HTTP API listen address")
    _env_flag(p, "--dns-addr", "127.0.0.1:8600",
              "DNS listen addresses, comma-separated HOST:PORT")
    _env_flag(p, "--domain", defaults.domain, "DNS domain served")
    _env_flag(p, "--alt-domain", "", "a second DNS domain served the same way (answers "
              "use the domain asked)")
    _env_flag(p, "--dns-a", defaults.dns_a, "what A queries for a service answer: vip (its "
              "virtual IP, through the proxy) or instances (instance addresses, as Consul)")
    _env_flag(p, "--udp-max", str(defaults.udp_max), "largest UDP answer in bytes; bigger "
              "answers are trimmed with TC=1", type=int)
    _env_list_flag(p, "--recursor", "ADDR[:PORT]",
                   "upstream resolver for names outside the DNS domains")
    _env_flag(p, "--recursor-timeout", str(defaults.recursor_timeout),
              "seconds to wait for each recursor", type=float)
    _env_list_flag(p, "--service-ttl", "NAME=SECONDS",
                   "TTL of a service's answers; NAME may be a prefix ending with * or *")
    _env_flag(p, "--node-ttl", str(defaults.node_ttl), "TTL of node, addr and PTR answers")
    soa = defaults.soa
    _env_flag(p, "--dns-soa-refresh", str(soa.refresh), "SOA refresh (seconds)")
    _env_flag(p, "--dns-soa-retry", str(soa.retry), "SOA retry (seconds)")
    _env_flag(p, "--dns-soa-expire", str(soa.expire), "SOA expire (seconds)")
    _env_flag(p, "--dns-soa-min-ttl", str(soa.min_ttl), "negative-caching TTL: the SOA "
              "minimum and the TTL of NXDOMAIN/NODATA answers (RFC 2308)")
    _env_list_flag(p, "--node-meta", "KEY=VALUE",
                   "this node's metadata, served as DNS TXT records of <node>.node")
    _env_flag(p, "--proxy-addr", "0.0.0.0:10000", "transparent proxy listen address")
    _env_flag(p, "--vip-cidr", defaults.vip_cidr, "range service VIPs come from")
    _env_flag(p, "--mark", hex(defaults.mark), "netfilter mark of the proxy's own connections")
    _env_flag(p, "--connect-timeout", str(defaults.connect_timeout),
              "seconds to wait for an endpoint to accept", type=float)
    _env_flag(p, "--base-ejection-time", str(defaults.base_ejection_time),
              "seconds an endpoint with 5 connect failures in a row stays out of its "
              "pool, times the number of its ejections (Envoy's base_ejection_time)",
              type=float)
    _env_flag(p, "--tcp-intercept", defaults.tcp_intercept,
              "how TCP to VIPs reaches the proxy: sk-lookup (a BPF program hands it "
              "over unchanged, Linux 5.9+), redirect (iptables REDIRECT, NAT), or auto "
              "(sk-lookup when the kernel allows it)")
    _env_flag(p, "--relay", defaults.relay,
              "byte mover: native (C splice engine), python, or auto (native when built)")
    _env_flag(p, "--max-connections", "auto", "connections the proxy relays at once; "
              "beyond it new ones are reset (auto: (RLIMIT_NOFILE - 256) / 2, at most 65536, "
              "as HAProxy derives maxconn)")
    _env_flag(p, "--max-pending-per-service", str(defaults.max_pending_per_service),
              "connections of one service still connecting to an endpoint; beyond it new "
              "ones are reset (Envoy's max_pending_requests)")
    _env_flag(p, "--dns-rate-limit", "0", "UDP DNS answers per second per client address "
              "(token bucket, burst of one second's worth, at least 1); over it queries are "
              "dropped, every second one answered with TC=1 (0: off)")
    p.add_argument("--no-iptables", action="store_true",
                   default=_env_bool("CONSULATE_NO_IPTABLES"),
                   help="do not install iptables rules or the VIP route (env "
                   "CONSULATE_NO_IPTABLES)")
    p.add_argument("--no-registrator", action="store_true",
                   default=_env_bool("CONSULATE_NO_REGISTRATOR"),
                   help="do not register this host's Docker containers (env "
                   "CONSULATE_NO_REGISTRATOR)")
    _env_flag(p, "--docker-host", "", "the Docker daemon whose containers the registrator "
              "registers (default: DOCKER_HOST, else unix:///var/run/docker.sock)")
    _env_flag(p, "--registrator-flags", "", "registrator options, as `consulate registrator "
              "-h` lists them (the agent sets -cleanup -resync 30 -ip <advertise>)")
    _env_flag(p, "--configurator", "", "run a configurator in the agent: the arguments of "
              "`consulate configurator` (its $services read this agent's registry)")
    p.add_argument("--scheduler", action="store_true",
                   default=_env_bool("CONSULATE_SCHEDULER"),
                   help="join the scheduler (Manifold): register this host as a node that "
                   "runs allocations, and stand for scheduler leader (env CONSULATE_SCHEDULER)")
    _env_flag(p, "--scheduler-rpc-addr", "", "HOST:PORT where this agent's scheduler takes "
              "the other agents' duplex connections (\"\": a unix socket in --data-dir, one "
              "host only)")
    _env_flag(p, "--scheduler-exec-netns", "", "network namespace (as `ip netns` names it: "
              "a lab container's) the exec driver runs its tasks in (\"\": the agent's own)")
    _env_flag(p, "--liveness-ttl", "10s", "how long what this agent registered outlives it: "
              "the agent heartbeats its instances every third of it; a host that dies or "
              "is cut off leaves every route within it")
    p.add_argument("--enable-script-checks", action="store_true",
                   default=_env_bool("CONSULATE_ENABLE_SCRIPT_CHECKS"),
                   help="run health checks that execute commands (Consul's Args checks; "
                   "off by default: anyone who may register could run code here)")
    p.add_argument("--ambassador", action="store_true",
                   default=_env_bool("CONSULATE_AMBASSADOR"),
                   help="ambassador omni mode (Ambassadord): a container's connection to the "
                   "bridge address on port P goes where its BACKEND_P variable or connect.P "
                   "label says (env CONSULATE_AMBASSADOR)")
    _env_flag(p, "--ambassador-addr", "0.0.0.0:10001", "where omni mode's listener takes the "
              "connections iptables redirects to it")
    _env_flag(p, "--bridge-ip", "", "the container bridge address omni mode takes over, on "
              "every port but the agent's own (default: docker0's address)")
    _env_flag(p, "--user", "", "run as this user (HAProxy's user): the agent, started as "
              "root, gives it --data-dir and keeps only the capabilities it uses, "
              "CAP_NET_ADMIN and CAP_NET_BIND_SERVICE (README: Privileges)")
    _env_flag(p, "--group", "", "run as this group (default: the --user's own)")
    p.add_argument("--keep-capabilities", action="store_true",
                   default=_env_bool("CONSULATE_KEEP_CAPABILITIES"),
                   help="keep every capability the agent was started with (by default it "
                   "drops those it does not use; env CONSULATE_KEEP_CAPABILITIES)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove the rules, chains and route a previous agent left, then exit")
    p.set_defaults(func=_cmd_agent)


def _agent_config(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(
        node=args.node, datacenter=args.datacenter, data_dir=Path(args.data_dir),
        advertise=args.advertise, http_addr=parse_hostport("--http-addr", args.http_addr),
        dns_addrs=[parse_hostport("--dns-addr", a) for a in args.dns_addr.split(",") if a],
        domain=args.domain, proxy_addr=parse_hostport("--proxy-addr", args.proxy_addr),
        vip_cidr=args.vip_cidr, mark=parse_mark(args.mark), iptables=not args.no_iptables,
        connect_timeout=args.connect_timeout, relay=args.relay,
        tcp_intercept=args.tcp_intercept, registry=_registry_of(args),
        base_ejection_time=args.base_ejection_time,
        max_connections=parse_count("--max-connections", args.max_connections, auto=True),
        max_pending_per_service=parse_count("--max-pending-per-service",
                                            args.max_pending_per_service),
        dns_rate_limit=parse_rate("--dns-rate-limit", args.dns_rate_limit),
        token=args.token,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
        ca_file=args.ca_file, client_cert=args.client_cert, client_key=args.client_key,
        http_max_conns_per_client=args.http_max_conns_per_client,
        alt_domain=args.alt_domain, dns_a=args.dns_a, udp_max=args.udp_max,
        recursors=[parse_recursor(r) for r in _listed(args.recursor, "--recursor")],
        recursor_timeout=args.recursor_timeout,
        service_ttls=dict(parse_service_ttl(s) for s in _listed(args.service_ttl,
                                                                "--service-ttl")),
        node_ttl=parse_seconds("--node-ttl", args.node_ttl),
        soa=SoaTimers(refresh=parse_seconds("--dns-soa-refresh", args.dns_soa_refresh),
                      retry=parse_seconds("--dns-soa-retry", args.dns_soa_retry),
                      expire=parse_seconds("--dns-soa-expire", args.dns_soa_expire),
                      min_ttl=parse_seconds("--dns-soa-min-ttl", args.dns_soa_min_ttl)),
        node_meta=dict(parse_node_meta(m) for m in _listed(args.node_meta, "--node-meta")),
        registrator=not args.no_registrator, docker_host=args.docker_host,
        registrator_flags=args.registrator_flags, configurator=args.configurator,
        enable_script_checks=args.enable_script_checks,
        liveness_ttl=parse_positive_seconds("--liveness-ttl", args.liveness_ttl),
        scheduler=args.scheduler,
        scheduler_rpc_addr=args.scheduler_rpc_addr and "{}:{}".format(*parse_hostport(
            "--scheduler-rpc-addr", args.scheduler_rpc_addr)),
        scheduler_exec_netns=args.scheduler_exec_netns,
        ambassador=args.ambassador, bridge_ip=args.bridge_ip,
        ambassador_addr=parse_hostport("--ambassador-addr", args.ambassador_addr),
        user=args.user, group=args.group, keep_capabilities=args.keep_capabilities,
    )


def _registry_of(args: argparse.Namespace) -> str:
    """``--registry``, or the agent ``--join`` names (not both)."""
    if not args.join:
        return str(args.registry)
    if args.registry != "embedded":
        raise CliError(f"--join {args.join} and --registry {args.registry}: give one of them")
    scheme = "https" if args.join.startswith("https://") else "http"
    host, port = parse_hostport("--join", args.join.removeprefix(f"{scheme}://"))
    return f"{scheme}://{host}:{port}"


def _cmd_agent(args: argparse.Namespace) -> int:
    config = _agent_config(args)
    if args.cleanup:
        removed = cleanup(config)
        print("removed consulate's iptables rules and VIP route" if removed
              else "nothing to clean up")
        return 0
    drop_for_agent(config)  # before any thread of the agent starts (capabilities are per thread)
    import uvloop

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Agent(config).run(stop)

    uvloop.run(serve())
    return 0


def _client(args: argparse.Namespace) -> AgentClient:
    return client_for(args)


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    """How a client command reaches the agent: address, token, TLS (Consul's CLI
    flags and, in CONSULATE_ form, its variables)."""
    _env_flag(p, "--http-addr", "127.0.0.1:8500", "the agent's HTTP API: HOST:PORT, or "
              "https://HOST:PORT for an agent serving TLS")
    _env_flag(p, "--token", "", "the agent's token, sent as X-Consul-Token")
    _env_flag(p, "--ca-file", "", "PEM CA certificate to check an https agent's "
              "certificate with (default: the system's CAs)", env="CONSULATE_CACERT")
    _env_flag(p, "--client-cert", "", "PEM client certificate, for an agent that verifies "
              "clients (--tls-ca)")
    _env_flag(p, "--client-key", "", "PEM private key of --client-cert")


def _add_client_commands(sub: Any) -> None:
    def client_parser(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = sub.add_parser(name, help=help)
        _add_connection_flags(p)
        p.set_defaults(func=func)
        return p

    p = client_parser("register", "register a service instance with the agent", _cmd_register)
    p.add_argument("name", help="service name")
    p.add_argument("address", metavar="ADDR:PORT", help="where the instance listens")
    p.add_argument("--id", help="instance id (default: the service name, as Consul)")
    p.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="a metadata pair (repeatable)")
    p.add_argument("--ttl", help="a TTL check such as 10s: the instance turns critical (no "
                   "traffic) unless renewed with PUT /v1/agent/check/pass/service:<id> "
                   "within it, and is removed after as long again")
    p.add_argument("--weight", type=int, help="the instance's share of the load (DNS SRV "
                   "weight, Consul's Weights.Passing; default 1)")
    p = client_parser("deregister", "remove a service instance", _cmd_deregister)
    p.add_argument("id", help="instance id")
    add_json_flag(client_parser("services", "list services with their instances",
                                cmd_services))
    add_json_flag(client_parser("routes", "show this agent's route table: VIPs and "
                                "endpoints", cmd_routes))
    add_json_flag(client_parser("status", "show the agent, its services, VIPs and "
                                "counters", cmd_status))


def _cmd_register(args: argparse.Namespace) -> int:
    host, sep, port = args.address.rpartition(":")
    if not sep or not is_decimal(port):
        raise CliError(f"address {args.address!r} is not ADDR:PORT (for example 10.0.0.5:80)")
    meta = {}
    for pair in args.meta:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CliError(f"--meta {pair!r} is not KEY=VALUE")
        meta[key] = value
    body: dict[str, Any] = {"Name": args.name, "Address": host, "Port": int(port),
                            "Tags": args.tag, "Meta": meta}
    if args.id:
        body["ID"] = args.id
    if args.weight is not None:
        body["Weights"] = {"Passing": args.weight}
    if args.ttl:
        try:
            parse_duration(args.ttl)
        except InvalidDefinition as exc:
            raise CliError(f"--ttl: {exc}") from None
        body["Check"] = {"TTL": args.ttl, "Status": "passing",
                         "DeregisterCriticalServiceAfter": args.ttl}
    _client(args).request("PUT", "/v1/agent/service/register", body)
    print(f"registered {body.get('ID', args.name)} ({args.name} at {host}:{port})")
    return 0


def _cmd_deregister(args: argparse.Namespace) -> int:
    _client(args).request("PUT", f"/v1/agent/service/deregister/{args.id}")
    print(f"deregistered {args.id}")
    return 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="build a lab, route by name, fail an instance, tear down")
    p.add_argument("--hosts", type=int, choices=(1, 3), default=1,
                   help="1: one host, a backend killed; 3: agents on 3 hosts sharing a "
                   "registry, a host cut off and back (default 1)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from consulate.control.demo import run_demo

    return run_demo(args.hosts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="consulate",
        description="consulate: a per-host routing mesh for containers. Containers reach "
        "any service by name (web.service.consul), transparently.",
    )
    parser.add_argument("--version", action="version", version=f"consulate {VERSION}")
    parser.add_argument("--log-level", default=os.environ.get("CONSULATE_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"],
                        help="log verbosity (env CONSULATE_LOG_LEVEL, default info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_agent(sub)
    _add_client_commands(sub)
    add_lab_parser(sub)
    add_registrator_parser(sub)
    add_configurator_parser(sub)
    add_scheduler_parsers(sub, _add_connection_flags)
    add_host_helper_parsers(sub)
    add_ambassador_parser(sub)
    _add_demo(sub)
    add_completion_parser(sub, parser)
    add_examples(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except (CliError, ApiError, ConfigError, IptablesError, LocalRouteError, OSError,
            PrivilegeError) as exc:
        print(f"consulate: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
