"""``consulate configurator <store-uri> <transformer> <target>``: the command line,
also what the agent's ``--configurator`` option takes.

Exit statuses follow sysexits.h as confd's users script against them: 64
(EX_USAGE) for bad arguments, 3 when the initial configuration fails to render
or to validate, 1 when the store cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from consulate.control.configurator.api import serve_api
from consulate.control.configurator.engine import (
    CheckFailed,
    Configurator,
    InvalidConfig,
    Template,
)
from consulate.control.configurator.quiescence import BadWait, Wait, parse_wait
from consulate.control.configurator.store_uri import BadStoreUri, open_store
from consulate.control.configurator.stores import StoreError
from consulate.control.configurator.target import SRC, TargetFile
from consulate.control.configurator.transformers import (
    NAMES,
    UnknownTransformer,
    make_transformer,
)
from consulate.control.registry.backend import RegistryBackend
from consulate.control.registry.location import BadLocation, open_registry, parse_location

EX_USAGE = 64
EX_INVALID_CONFIG = 3
DEFAULT_PORT = 9000
DEFAULT_REGISTRY = "consul://127.0.0.1:8500"  # the local agent's Consul-compatible API


class UsageError(ValueError):
    """A bad argument; the command exits 64."""


class UsageParser(argparse.ArgumentParser):
    """Exits 64 (EX_USAGE) on any usage error, unknown options included."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        found, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return found, extra


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="where the JSON document lives: file://PATH, "
                   "consulate://HOST:PORT/PREFIX, consul://HOST:PORT/PREFIX or "
                   "etcd://HOST:PORT[,...]/PREFIX")
    p.add_argument("transformer", help=f"output format: {', '.join(NAMES)}")
    p.add_argument("target", help="the configuration file to write")
    p.add_argument("-p", "--port", type=int, default=DEFAULT_PORT,
                   help=f"REST API port on 127.0.0.1 (default {DEFAULT_PORT})")
    p.add_argument("-c", "--check", help=f"command validating the staged file named {SRC} "
                   "(default: nginx -t -q -c {{.src}} for nginx-conf, haproxy -c -q -f {{.src}} "
                   "for haproxy-cfg, none otherwise; '' for none)")
    p.add_argument("-r", "--reload", default="", help="command run after the target changed "
                   "(for example 'nginx -s reload')")
    p.add_argument("-v", "--verbose", action="store_true", help="log every event (debug)")
    p.add_argument("--wait", default="0", metavar="MIN[:MAX]", help="quiescence: render "
                   "MIN after the last change, at most MAX (default 4x MIN) after the first; "
                   "at most one reload per window (default 0: at once)")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help="where $services reads "
                   "instances: consul://HOST:PORT (a consulate or Consul agent's API) or "
                   f"etcd://HOST:PORT[,...][/PREFIX] (default {DEFAULT_REGISTRY})")
    p.add_argument("--template", action="append", default=[], metavar="TRANSFORMER:TARGET",
                   help="another output of the same document (repeatable), such as "
                   "jinja2:/etc/app/status.j2:/var/www/status.html")


def add_configurator_parser(sub: Any) -> None:
    p = sub.add_parser("configurator", help="serve a REST API that renders a JSON document "
                       "into a program's configuration file (nginx, HAProxy, ...)",
                       description="Keep a configuration file rendered from a JSON document "
                       "(edited over REST, watched in its store) and the live instances of "
                       "registry services; validate, replace atomically, reload, roll back.")
    p.__class__ = UsageParser  # exit 64 on usage errors, as confd does (sysexits.h)
    add_arguments(p)
    p.set_defaults(func=run_command_line)


@dataclass
class Options:
    store: str
    templates: list[tuple[str, str]]
    check: str | None
    reload: str
    port: int
    wait: Wait
    registry: str
    verbose: bool = False


def options_from(args: argparse.Namespace) -> Options:
    templates = [(args.transformer, args.target)]
    for spec in args.template:
        transformer, sep, target = spec.rpartition(":")
        if not sep or not transformer or not target:
            raise UsageError(f"--template {spec!r} is not TRANSFORMER:TARGET "
                             "(for example toml:/etc/app.toml)")
        templates.append((transformer, target))
    if not 0 <= args.port <= 65535:
        raise UsageError(f"-p {args.port}: a port is 0 to 65535")
    if args.check and SRC not in args.check:
        raise UsageError(f"-c {args.check!r} must name the staged file as {SRC} (for "
                         "example 'nginx -t -c {{.src}}')")
    try:
        wait = parse_wait(args.wait)
    except BadWait as exc:
        raise UsageError(str(exc)) from None
    return Options(args.store, templates, args.check, args.reload, args.port, wait,
                   args.registry, args.verbose)


def build(options: Options, registry: RegistryBackend | None = None) -> Configurator:
    """The configurator the options describe (UsageError for a bad one); ``registry``
    is the agent's own when it runs inside the agent."""
    templates = []
    for spec, target in options.templates:
        try:
            transformer = make_transformer(spec)
        except UnknownTransformer as exc:
            raise UsageError(str(exc)) from None
        path = Path(target)
        if not path.absolute().parent.is_dir():
            raise UsageError(f"target {target!r}: the directory "
                             f"{str(path.absolute().parent)!r} does not exist")
        check = transformer.check if options.check is None else options.check
        templates.append(Template(transformer, TargetFile(path), check))
    try:
        store = open_store(options.store)
    except BadStoreUri as exc:
        raise UsageError(str(exc)) from None
    describe = options.registry
    if registry is None:
        try:
            location = parse_location(options.registry)
        except BadLocation as exc:
            raise UsageError(str(exc)) from None
        if location.kind == "embedded":
            raise UsageError("--registry embedded lives inside the agent: pass the agent's "
                             f"API ({DEFAULT_REGISTRY}) or run the configurator in the agent")
        return Configurator(store, templates, reload=options.reload, wait=options.wait,
                            registry=open_registry(location, Path(".")),  # no data dir:
                            # only remote registries (consul://, etcd://) get here
                            registry_describe=describe, owns_registry=True)
    return Configurator(store, templates, reload=options.reload, wait=options.wait,
                        registry=registry, registry_describe="the agent's registry")


async def serve(configurator: Configurator, port: int, stop: asyncio.Event) -> None:
    """Start (InvalidConfig/CheckFailed for a bad initial document), serve the API
    on 127.0.0.1:``port`` until ``stop``."""
    try:
        await configurator.start()
        runner = await serve_api(configurator, port)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        await configurator.close()


def run_command_line(args: argparse.Namespace) -> int:
    try:
        options = options_from(args)
    except UsageError as exc:
        print(f"consulate configurator: error: {exc}", file=sys.stderr)
        return EX_USAGE
    if options.verbose:
        logging.getLogger("consulate").setLevel(logging.DEBUG)
    import uvloop

    async def main() -> int:
        try:
            configurator = build(options)  # its clients need the running loop
        except UsageError as exc:
            print(f"consulate configurator: error: {exc}", file=sys.stderr)
            return EX_USAGE
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(configurator, options.port, stop)
        except (InvalidConfig, CheckFailed) as exc:
            print(f"consulate configurator: the initial configuration from {options.store} "
                  f"is invalid: {exc}", file=sys.stderr)
            return EX_INVALID_CONFIG
        except StoreError as exc:
            print(f"consulate configurator: error: {exc}", file=sys.stderr)
            return 1
        return 0

    return uvloop.run(main())
