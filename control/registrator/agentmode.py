"""The registrator inside ``consulate agent``: this host's containers into this agent.

It starts when a Docker socket is there (``--docker-host``, else DOCKER_HOST,
else the local socket) unless ``--no-registrator``, registers through the
``consulate://`` adapter into the agent's own API (over https, pinned to the
agent's own certificate, when it serves TLS), and never gives up: it waits
for dockerd as long as it takes and reconnects whenever dockerd restarts.
Because the agent owns this host's registrations, ``-cleanup`` and a resync
every 30 s are on by default, and ports bound to 0.0.0.0 get the agent's
``--advertise`` address; ``--registrator-flags`` can change any of that.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import stat
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from consulate.control.config import AgentConfig, ConfigError
from consulate.control.registrator import flags
from consulate.control.registrator.adapters import Adapter
from consulate.control.registrator.adapters.consul import ConsulateAdapter
from consulate.control.registrator.adapters.consul_http import TOKEN_VARIABLE
from consulate.control.registrator.adapters.consul_tls import own_agent_https
from consulate.control.registrator.docker_source import DockerSource, docker_host
from consulate.control.registrator.runner import StartupError, run

log = logging.getLogger("consulate.registrator")

AGENT_RESYNC = 30  # seconds


def agent_options(config: AgentConfig) -> flags.Options:
    """The agent's defaults, then ``--registrator-flags`` (later flags win)."""
    defaults = ["-cleanup", "-resync", str(AGENT_RESYNC), "-ip", config.advertise,
                "-retry-attempts", "-1"]
    try:
        options = flags.parse_options([*defaults, *shlex.split(config.registrator_flags)])
        options.validate()
    except (flags.UsageError, flags.InvalidOptions, ValueError) as exc:
        raise ConfigError(f"--registrator-flags {config.registrator_flags!r}: {exc} "
                          "(see `consulate registrator -h`)") from None
    return replace(options, uri="consulate://{}:{}".format(*own_api_address(config)))


def own_api_address(config: AgentConfig) -> tuple[str, int]:
    """Where this agent's API answers its own registrator (loopback for 0.0.0.0)."""
    http_host, http_port = config.http_addr
    return ("127.0.0.1" if http_host == "0.0.0.0" else http_host), http_port


def no_docker_reason(host: str) -> str | None:
    """Why the registrator cannot start at ``host``, or None when it can try."""
    if not host.startswith("unix://"):
        return None  # tcp: only connecting tells; the registrator waits for it
    path = host.removeprefix("unix://")
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        is_socket = False
    return None if is_socket else f"no Docker socket at {path}"


class AgentRegistrator:
    """Built with the agent, so that bad ``--registrator-flags`` stop it before it
    starts anything (ConfigError); started once the agent's API listens."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.options = agent_options(config)

    def serving(self) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """What runs the registrator (the agent supervises it); None, and a log line
        saying why, when it is off."""
        if not self.config.registrator:
            log.info("event=registrator state=off reason=--no-registrator")
            return None
        host = docker_host(self.config.docker_host)
        reason = no_docker_reason(host)
        if reason is not None:
            log.info("event=registrator state=off reason=%r hint='pass --docker-host or set "
                     "DOCKER_HOST'", reason)
            return None
        if self.config.token:  # it writes into this agent's API, which wants the token
            os.environ[TOKEN_VARIABLE] = self.config.token
        # The agent's TLS files were loaded (and checked) when it built its API's context.
        https = (own_agent_https(self.config.tls_cert, self.config.tls_key,
                                 client_cert=bool(self.config.tls_ca))
                 if self.config.tls_cert else None)
        adapter = ConsulateAdapter(self.options.uri, self.config.node,
                                   *own_api_address(self.config), https)
        log.info("event=registrator state=on docker=%s registry=%s", host, self.options.uri)
        docker = DockerSource(host)
        return lambda: _serve(self.options, self.config.node, docker, adapter)


async def _serve(options: flags.Options, node: str, docker: DockerSource,
                 adapter: Adapter) -> None:
    """Run until cancelled with the agent; only a finite -retry-attempts ends it sooner."""
    try:
        await run(options, hostname=node, docker=docker, adapter=adapter, stop=asyncio.Event())
    except StartupError as exc:
        log.error("event=registrator state=stopped reason=%r", str(exc))
