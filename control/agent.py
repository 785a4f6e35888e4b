"""The per-host agent: composes registry -> watch -> RouteTable -> proxy, DNS, iptables.

Start order is chosen so that no connection is ever misrouted: the route table
is filled from a registry snapshot and the proxy listens before the iptables
rules appear; on the way out the rules go first, so traffic to VIPs is refused
(local route) rather than sent to a proxy that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from dnslib import RCODE

from consulate import native
from consulate.control import discover_api, metrics, routes_api, ui
from consulate.control.ambassador_docker import OmniAmbassador, start_omni
from consulate.control.api_context import ApiContext
from consulate.control.config import AgentConfig, ConfigError
from consulate.control.health.runner import HealthRunner
from consulate.control.http_api import build_app
from consulate.control.http_listener import ApiSite
from consulate.control.local_services import LocalServices
from consulate.control.registrator.agentmode import AgentRegistrator
from consulate.control.registry import Change, Instance
from consulate.control.registry.hub import WatchHub
from consulate.control.registry.location import open_registry, parse_location
from consulate.control.scheduler import api as scheduler_api
from consulate.control.scheduler.host import SchedulerHost
from consulate.control.supervisor import Supervisor
from consulate.control.tls import server_tls
from consulate.dns.answer import Responder
from consulate.dns.server import DnsServer
from consulate.proxy import iptables, localroute
from consulate.proxy.outlier import OutlierPolicy
from consulate.proxy.server import TransparentProxy
from consulate.proxy.sklookup import REDIRECT
from consulate.proxy.table import Endpoint, RouteTable
from consulate.proxy.udp import UdpProxy
from consulate.proxy.vip import VipAllocator

if TYPE_CHECKING:
    from consulate.native.engine import SpliceEngine

log = logging.getLogger("consulate.agent")

VERSION = "0.1.0"
ROUTES_STARTUP_WAIT = 5.0  # how long the start waits for the registry's first snapshot


def endpoint_of(instance: Instance) -> Endpoint | None:
    """The route to an instance, or None while its checks say critical (Consul
    routes no traffic there); a warning instance gets its Warning weight."""
    weight = instance.routed_weight
    if weight is None:
        return None
    return Endpoint(service=instance.name, id=instance.id, address=instance.address,
                    port=instance.port, tags=instance.tags, node=instance.node,
                    weight=weight, lb=instance.meta.get("lb", ""))


def apply_change(table: RouteTable, change: Change) -> None:
    """Feed one registry change into the route table."""
    if change.kind == "snapshot":
        table.replace_all(e for e in map(endpoint_of, change.instances) if e is not None)
        return
    for instance in change.instances:
        endpoint = endpoint_of(instance) if change.kind == "up" else None
        if endpoint is not None:
            table.upsert(endpoint)
        else:
            table.remove(instance.id)


def cleanup(config: AgentConfig) -> bool:
    """Remove every rule, chain and route an agent may have left; True if any was there."""
    removed_rules = iptables.remove_rules()
    removed_route = localroute.remove(config.vip_cidr)
    return removed_rules or removed_route


class Agent:
    """One host's mesh agent; ``run`` serves until ``stop`` is set."""

    def __init__(self, config: AgentConfig) -> None:
        config.validate()
        self.config = config
        self.registrator = AgentRegistrator(config)
        self.started_at = time.time()
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True)
            (config.data_dir / ".writable").touch()
        except OSError as exc:
            raise ConfigError(
                f"--data-dir {str(config.data_dir)!r} is not usable ({exc.strerror}): "
                "choose a writable directory"
            ) from None
        tls = server_tls(config.tls_cert, config.tls_key, config.tls_ca)
        self.tls = tls.context() if tls is not None else None  # files checked before any start
        self.registry = open_registry(parse_location(config.registry), config.data_dir,
                                      token=config.token, tls_files=(
                                          config.ca_file, config.client_cert,
                                          config.client_key))
        self.hub = WatchHub(self.registry)
        self.local = LocalServices(self.registry, config.data_dir / "services.json",
                                   config.liveness_ttl)
        self.table = RouteTable(VipAllocator(config.vip_cidr, config.data_dir / "vips.json"))
        self.proxy = TransparentProxy(self.table, engine=_relay_engine(config),
                                      mark=config.mark, connect_timeout=config.connect_timeout,
                                      outlier=OutlierPolicy(
                                          base_ejection_time=config.base_ejection_time),
                                      limits=config.connection_limits())
        dns_config = config.dns_config()
        self.dns = DnsServer(Responder(self.table, dns_config), dns_config)
        self.udp: UdpProxy | None = None  # UDP to VIPs needs the iptables rules
        self.ambassador: OmniAmbassador | None = None  # --ambassador
        self.manifold = (SchedulerHost.for_agent(self.registry, config) if config.scheduler
                         else None)
        self.started = False
        self.routes_synced = asyncio.Event()
        self.supervisor = Supervisor()

    async def run(self, stop: asyncio.Event) -> None:
        async with contextlib.AsyncExitStack() as stack:
            await self._start(stack)
            self.started = True
            log.info("event=ready node=%s http=%s:%d proxy=%s:%d services=%d", self.config.node,
                     *self.config.http_addr, *self.config.proxy_addr, len(self.table.services()))
            await stop.wait()
            log.info("event=shutdown node=%s", self.config.node)

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.config
        self.registry.start()
        stack.push_async_callback(self.registry.close)
        self.local.start()  # heartbeats, and re-registers what expired while it was down
        stack.push_async_callback(self.local.close)

        stack.push_async_callback(self.supervisor.close)
        self.supervisor.start("routes", self._follow_registry)
        self.supervisor.start("watch-hub", self.hub.follow)
        await self._routes_before_listening()

        # Without the VIP route (--no-iptables) nothing would be steered: REDIRECT
        # semantics (SO_ORIGINAL_DST) serve whoever redirects to the proxy then.
        await self.proxy.start(*cfg.proxy_addr,
                               intercept=cfg.tcp_intercept if cfg.iptables else REDIRECT)
        stack.push_async_callback(self.proxy.close)
        for host, port in cfg.dns_addrs:
            await self.dns.listen(host, port)
        stack.callback(self.dns.close)
        self.ambassador = await start_omni(cfg, self.table, stack) if cfg.ambassador else None

        if cfg.iptables:
            localroute.add(cfg.vip_cidr)
            stack.callback(localroute.remove, cfg.vip_cidr)
            rules = iptables.RedirectRules(
                cfg.vip_cidr, cfg.proxy_addr[1], cfg.mark,
                ambassador=self.ambassador.redirect if self.ambassador is not None else None,
                tcp=self.proxy.intercept == REDIRECT)
            iptables.install_rules(rules)
            stack.callback(iptables.remove_rules)
            self.udp = UdpProxy(self.table, rules)
            await self.udp.start()
            stack.push_async_callback(self.udp.close)

        stack.push_async_callback(self.hub.close)
        app = build_app(self._api_context())
        discover_api.add_routes(app, self.registry, self.hub, cfg.node)
        metrics.add_routes(app, self.scrape)
        routes_api.add_routes(app, self.table)
        ui.add_routes(app, self.registry)
        app.router.add_get("/v1/agent/ready", self._readiness)
        scheduler_api.add_routes(app, self.manifold)
        # Cancel a handler when its client goes: a long poll or an event stream
        # whose client left must release its watch at once (aiohttp's default
        # keeps it until the wait runs out, or forever for a quiet stream).
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await ApiSite(runner, *cfg.http_addr, ssl_context=self.tls,
                      max_conns_per_client=cfg.http_max_conns_per_client).start()
        log.info("event=listen component=http address=%s:%d tls=%s client_certs=%s",
                 *cfg.http_addr, "on" if self.tls else "off",
                 "required" if cfg.tls_ca else "no")

        if cfg.configurator:
            from consulate.control.configurator.agentmode import start_in_agent

            await start_in_agent(cfg.configurator, self.registry, stack)
        registrator = self.registrator.serving()  # registers through the API just started
        if registrator is not None:
            self.supervisor.start("registrator", registrator)
        if self.manifold is not None:
            self.manifold.start()
            stack.push_async_callback(self.manifold.close)

    async def _follow_registry(self) -> None:
        """The routes component: a fresh watch (a snapshot, then changes) each start."""
        async for change in self.registry.watch():
            apply_change(self.table, change)
            self.routes_synced.set()

    async def _routes_before_listening(self) -> None:
        """Program the routes before the proxy listens, so that no early connection is
        misrouted; a registry that does not answer in time leaves the agent up but
        not ready (VIP connections are refused by the local route until it is)."""
        try:
            async with asyncio.timeout(ROUTES_STARTUP_WAIT):
                await self.routes_synced.wait()
        except TimeoutError:
            log.warning("event=not-ready reason='no answer from the registry at %s within "
                        "%gs: routes are programmed once it answers'", self.config.registry,
                        ROUTES_STARTUP_WAIT)

    async def _readiness(self, request: web.Request) -> web.Response:
        """``GET /v1/agent/ready``: 200 once routes are programmed, else 503 and why."""
        if self.ready:
            return web.json_response({"Ready": True})
        return web.json_response({"Ready": False, "Reason": (
            f"routes are not programmed yet: the registry at {self.config.registry} has "
            "not answered")}, status=503)

    @property
    def ready(self) -> bool:
        """Listening, with routes programmed from the registry."""
        return self.started and self.routes_synced.is_set()

    def _api_context(self) -> ApiContext:
        cfg = self.config
        return ApiContext(
            self.registry, node=cfg.node, node_address=cfg.advertise,
            datacenter=cfg.datacenter, leader=f"{cfg.advertise}:{cfg.http_addr[1]}",
            self_info=self.self_info, token=cfg.token,
            kv_reads_need_token=cfg.http_beyond_loopback,
            health=HealthRunner(self.registry, cfg.node,
                                scripts_enabled=cfg.enable_script_checks,
                                on_deregister=self.local.removed),
            local=self.local,
        )

    def scrape(self) -> metrics.Scrape:
        """Every counter ``/metrics`` shows, read now from the parts that keep them."""
        return metrics.Scrape(
            proxy=self.proxy.stats_snapshot(), relay=self.proxy.relay_name,
            endpoints={s.name: len(s.endpoints) for s in self.table.services()},
            route_version=self.table.version, dns_rcodes=tuple(self.dns.rcodes),
            watch=self.hub.stats(),
            dns_rate_limited=(self.dns.rate_limit.limited if self.dns.rate_limit is not None
                              else None))

    def self_info(self) -> dict[str, Any]:
        """``GET /v1/agent/self``: Consul's Config and Member blocks plus consulate's Stats."""
        cfg = self.config
        caps = native.capabilities()
        return {
            "Config": {
                "Datacenter": cfg.datacenter,
                "NodeName": cfg.node,
                "Version": VERSION,
                "Domain": cfg.domain,
                "Server": True,
            },
            "Member": {"Name": cfg.node, "Addr": cfg.advertise, "Port": cfg.http_addr[1],
                       "Status": 1},
            "Stats": {
                "registry": {"location": cfg.registry, "owned_instances": len(self.local)},
                # the registry not answering the heartbeats: routes stay as last seen
                "heartbeats": {"failing": bool(self.local.heartbeat_error),
                               "error": self.local.heartbeat_error},
                "components": self.supervisor.status(),
                "agent": {"pid": os.getpid(), "ready": self.ready,
                          "uptime_seconds": round(time.time() - self.started_at, 3)},
                "routes": {"version": self.table.version,
                           "services": {s.name: {"vip": str(s.vip),
                                                 "endpoints": len(s.endpoints)}
                                        for s in self.table.services()}},
                "proxy": self.proxy.stats_snapshot(),
                "udp": self.udp.stats_snapshot() if self.udp is not None else None,
                "ambassador": (self.ambassador.server.stats_snapshot()
                               if self.ambassador is not None else None),
                "watch": self.hub.stats(),
                "dns": {"responses": {RCODE.forward.get(code, str(code)): count
                                      for code, count in enumerate(self.dns.rcodes) if count}},
                "relay": {"engine": self.proxy.relay_name, "native_extension": caps.extension,
                          "splice_available": caps.splice},
                "iptables": {"enabled": cfg.iptables, "vip_cidr": cfg.vip_cidr,
                             "proxy_port": cfg.proxy_addr[1], "mark": hex(cfg.mark),
                             "tcp_intercept": self.proxy.intercept},
            },
        }


def _relay_engine(config: AgentConfig) -> SpliceEngine | None:
    """The native engine for ``--relay native|auto`` when it can run here, else None."""
    choice = config.relay
    caps = native.capabilities()
    if choice == "python" or (choice == "auto" and not caps.splice):
        return None
    if not caps.extension:
        raise ConfigError("--relay native: the C extension is not built (reinstall with a C "
                          "compiler) or CONSULATE_NO_EXTENSIONS is set; use --relay python")
    if not caps.splice:
        raise ConfigError("--relay native: splice(2) is refused on this kernel; "
                          "use --relay python")
    from consulate.native.engine import SpliceEngine

    return SpliceEngine(connect_timeout=config.connect_timeout)
