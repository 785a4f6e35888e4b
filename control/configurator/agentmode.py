"""A configurator inside the agent (``consulate agent --configurator "ARGS"``): the
same arguments as ``consulate configurator``, with the agent's own registry
feeding ``$services`` (no HTTP round trip, no second watch on a remote registry).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex

from consulate.control.config import ConfigError
from consulate.control.configurator.api import serve_api
from consulate.control.configurator.command import (
    UsageError,
    UsageParser,
    add_arguments,
    build,
    options_from,
)
from consulate.control.configurator.engine import CheckFailed, InvalidConfig
from consulate.control.configurator.stores import StoreError
from consulate.control.registry.backend import RegistryBackend


def _parse(arguments: str) -> argparse.Namespace:
    parser = UsageParser(prog="--configurator", add_help=False)
    add_arguments(parser)
    try:
        return parser.parse_args(shlex.split(arguments))
    except SystemExit:  # the parser printed why
        raise ConfigError(f"--configurator {arguments!r}: give the arguments of `consulate "
                          "configurator` (see `consulate configurator -h`)") from None


async def start_in_agent(arguments: str, registry: RegistryBackend,
                         stack: contextlib.AsyncExitStack) -> None:
    """Start the configurator and its API; ``stack`` stops them with the agent."""
    try:
        options = options_from(_parse(arguments))
        configurator = build(options, registry)
    except (UsageError, ValueError) as exc:
        raise ConfigError(f"--configurator: {exc}") from None
    stack.push_async_callback(configurator.close)
    try:
        await configurator.start()
    except (InvalidConfig, CheckFailed, StoreError) as exc:
        raise ConfigError(f"--configurator: the initial configuration from {options.store} "
                          f"cannot be used: {exc}") from None
    runner = await serve_api(configurator, options.port)
    stack.push_async_callback(runner.cleanup)
