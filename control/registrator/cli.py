"""``consulate registrator [options] <registry URI>``: registrator's command line.

The arguments are handed over untouched to the Go-style parser in ``flags``,
so registrator's own invocations work as they are. Exit statuses are
registrator's: 2 for usage errors and an unrecognized adapter, 1 when options
are refused or Docker or the backend cannot be reached, 0 on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys

from consulate.control.agent import VERSION
from consulate.control.registrator import flags
from consulate.control.registrator.adapters import RegistryUriError, open_adapter
from consulate.control.registrator.docker_source import DockerSource, docker_host
from consulate.control.registrator.runner import StartupError, run
from consulate.control.tls import TlsError

log = logging.getLogger("consulate.registrator")


def add_registrator_parser(
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # prefix_chars that no argument starts with: argparse then leaves every
    # argument, -h included, to the Go-style parser.
    parser = subparsers.add_parser(
        "registrator", add_help=False, prefix_chars="\0",
        help="register Docker containers' services in a registry, as gliderlabs/registrator "
             "(`consulate registrator -h` for its options)")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=_cmd_registrator)


def _cmd_registrator(args: argparse.Namespace) -> int:
    try:
        options = flags.parse(args.args)
    except flags.HelpRequested:
        sys.stderr.write(flags.usage())
        return 0
    except flags.UsageError as exc:
        sys.stderr.write(f"{exc}\n\n{flags.usage()}")
        return 2
    if options.version:
        print(f"consulate registrator {VERSION}")
        return 0
    try:
        options.validate()
        adapter = open_adapter(options.uri, socket.gethostname())
    except (flags.InvalidOptions, TlsError) as exc:  # TlsError: a CONSUL_* TLS variable
        print(f"consulate: error: {exc}", file=sys.stderr)
        return 1
    except RegistryUriError as exc:
        print(f"consulate: error: {exc}", file=sys.stderr)
        return 2
    log.info("Starting registrator %s ...", VERSION)
    log.info("Using %s adapter: %s", options.uri.split(":", 1)[0], options.uri)
    import uvloop

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(options, hostname=adapter.hostname, docker=DockerSource(docker_host()),
                  adapter=adapter, stop=stop)

    try:
        uvloop.run(serve())
    except StartupError as exc:
        print(f"consulate: error: {exc}", file=sys.stderr)
        return 1
    return 0
