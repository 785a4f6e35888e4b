"""``consulate ambassador <spec>``: a standalone listener routing every connection by one spec.

Ambassadord's single-backend mode: ``consulate ambassador 10.0.0.5:6379`` listens on
port 10000 (``--listen HOST:PORT``) and forwards each connection there; a list
is balanced round robin, a service name follows the live instances an agent's
registry knows (``--http-addr``), and a ``consul://``/``etcd://`` key is watched.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

from consulate.control.cli_examples import ExampleFormatter
from consulate.control.config import ConfigError, parse_hostport
from consulate.control.etcd_client import open_client
from consulate.control.registry.client import RegistryClient, RegistryClientError, ServiceSet
from consulate.proxy.ambassador import DEFAULT_PORT, Ambassador, ServiceRoute
from consulate.proxy.ambassador_kv import KvWatchers
from consulate.proxy.ambassador_spec import FORMS, BadSpec, Target, parse_spec

REGISTRY_TIMEOUT = 5.0


class RegistryServices:
    """``ServiceLookup`` through an agent's registry API: one live set per name asked for."""

    def __init__(self, client: RegistryClient) -> None:
        self._client = client
        self._sets: dict[str, ServiceSet] = {}

    async def service(self, name: str) -> ServiceRoute | None:
        found = self._sets.get(name)
        if found is None:
            try:
                found = await self._client.service_set(name, timeout=REGISTRY_TIMEOUT)
            except (RegistryClientError, TimeoutError) as exc:
                raise ConnectionError(f"the agent at {self._client.url} did not give the "
                                      f"instances of {name!r} ({exc or 'timeout'}): start "
                                      "it, or point --http-addr at one") from None
            self._sets[name] = found
        return ServiceRoute(tuple(Target(*i.host_port) for i in found.instances))

    async def close(self) -> None:
        for found in self._sets.values():
            await found.close()
        await self._client.close()


def add_ambassador_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ambassador", help="listen and forward every connection by one backend spec",
        description="A standalone ambassador (Ambassadord): every connection to --listen "
        f"goes where SPEC says: {FORMS}. A KV key holds such a spec as text and is watched.",
        epilog="example:\n  consulate ambassador 10.0.0.5:6379,10.0.0.6:6379 --listen "
        "127.0.0.1:6379\n  consulate ambassador consul://127.0.0.1:8500/ambassador/redis\n",
        formatter_class=ExampleFormatter)
    p.add_argument("spec", metavar="SPEC", help="where connections go")
    p.add_argument("--listen", default=os.environ.get("CONSULATE_LISTEN",
                                                      f"0.0.0.0:{DEFAULT_PORT}"),
                   help=f"HOST:PORT to listen on (env CONSULATE_LISTEN, default "
                   f"0.0.0.0:{DEFAULT_PORT})")
    p.add_argument("--http-addr", default=os.environ.get("CONSULATE_HTTP_ADDR",
                                                         "127.0.0.1:8500"),
                   help="the agent whose registry resolves a service name (env "
                   "CONSULATE_HTTP_ADDR, default 127.0.0.1:8500)")
    p.add_argument("--connect-timeout", type=float, default=2.0,
                   help="seconds to wait for a backend to accept (default 2)")
    p.set_defaults(func=_cmd_ambassador)


def _cmd_ambassador(args: argparse.Namespace) -> int:
    listen = parse_hostport("--listen", args.listen)
    http = parse_hostport("--http-addr", args.http_addr)
    try:
        parse_spec(args.spec)
    except BadSpec as exc:
        raise ConfigError(str(exc)) from None
    if not args.connect_timeout > 0:
        raise ConfigError(f"--connect-timeout {args.connect_timeout} must be above 0")
    import uvloop

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        services = RegistryServices(RegistryClient(f"http://{http[0]}:{http[1]}"))
        ambassador = Ambassador(spec=args.spec, services=services,
                                kv=KvWatchers(open_client),
                                connect_timeout=args.connect_timeout)
        try:
            await ambassador.start(*listen)
            await stop.wait()
        finally:
            await ambassador.close()
            await services.close()

    uvloop.run(serve())
    return 0
