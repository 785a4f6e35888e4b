"""The ambassador's callers, found through the Docker API (omni mode).

A connection's source IP is looked up in a ``CallerCache``; on a miss the
running containers are inspected (all of them, concurrently: every caller seen
then is cached at once, and one refresh serves every connection waiting for it).
The Docker event stream keeps the cache true: ``die``/``destroy`` forget the
container, ``start`` forgets the IPs known to have no container; when the stream
breaks, the cache is emptied (events may have been missed) and the stream is
reopened with backoff. A refresh that an event overtook is used for the connections
waiting on it but not cached: what it saw may have died or started since. The
Docker calls are the registrator's ``DockerSource``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from consulate.control.config import AgentConfig, ConfigError
from consulate.control.etcd_client import open_client
from consulate.control.host_helpers import bridge_address
from consulate.control.registrator.docker_source import (
    DockerSource,
    DockerUnavailable,
    EventStreamEnded,
    docker_host,
)
from consulate.control.tasks import cancel_and_wait
from consulate.proxy.ambassador import Ambassador, TableServices
from consulate.proxy.ambassador_callers import Caller, CallerCache, caller_of
from consulate.proxy.ambassador_kv import KvWatchers
from consulate.proxy.iptables import AmbassadorRedirect
from consulate.proxy.table import RouteTable

log = logging.getLogger("consulate.ambassador")

BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds before reopening the event stream, then the last


class DockerCallers:
    """``CallerLookup`` for ``Ambassador``, backed by one Docker daemon."""

    def __init__(self, source: DockerSource, cache: CallerCache | None = None) -> None:
        self._source = source
        self.cache = cache if cache is not None else CallerCache()
        self._refresh: asyncio.Task[tuple[dict[str, Caller], int]] | None = None
        self._events: asyncio.Task[None] | None = None
        # Bumped by every event: a refresh that saw another generation is not cached
        # (a container may have died, or started, after it was inspected).
        self._generation = 0

    async def start(self) -> None:
        """Connect and subscribe to events (DockerUnavailable when dockerd does not answer)."""
        await self._source.connect()
        subscribed = asyncio.get_running_loop().create_future()
        self._events = asyncio.get_running_loop().create_task(self._follow(subscribed))
        await subscribed

    async def close(self) -> None:
        if self._events is not None:
            await cancel_and_wait(self._events)
            self._events = None
        if self._refresh is not None and not self._refresh.done():
            await cancel_and_wait(self._refresh)
        self._source.close()

    async def caller(self, ip: str) -> Caller | None:
        cached = self.cache.get(ip)
        if cached is not None:
            return cached.caller
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._inspect_all())
        try:
            found, generation = await asyncio.shield(self._refresh)
        except DockerUnavailable as exc:
            raise ConnectionError(str(exc)) from None
        caller = found.get(ip)
        if caller is None and generation == self._generation:
            self.cache.put(ip, None)
        return caller

    async def _inspect_all(self) -> tuple[dict[str, Caller], int]:
        """Every running container by address, and the event generation it was taken
        in: cached only if no event came meanwhile."""
        generation = self._generation
        ids = await self._source.running()
        inspected = await asyncio.gather(*(self._source.inspect(i) for i in ids))
        found: dict[str, Caller] = {}
        for data in inspected:
            described = caller_of(data) if data is not None else None
            if described is None:
                continue
            ips, caller = described
            for problem in caller.rules.problems:
                log.warning("event=bad-rule container=%s error=%r", caller.name, problem)
            found.update(dict.fromkeys(ips, caller))
        if generation == self._generation:
            for ip, caller in found.items():
                self.cache.put(ip, caller)
        return found, generation

    async def _follow(self, subscribed: asyncio.Future[None]) -> None:
        failures = 0
        while True:
            try:
                async for event in self._source.events():
                    self._generation += 1
                    if event is None:
                        _resolve(subscribed)
                        failures = 0
                    elif event.action == "start":
                        self.cache.container_started()
                    else:
                        gone = self.cache.container_gone(event.container_id)
                        if gone:
                            log.info("event=caller-forgotten container=%s action=%s ips=%s",
                                     event.container_id[:12], event.action, ",".join(gone))
            except (EventStreamEnded, DockerUnavailable) as exc:
                self._generation += 1
                _resolve(subscribed)
                self.cache.clear()
                delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                log.warning("event=docker-events-ended retry_in=%.1f error=%r", delay, str(exc))
                failures += 1
                await asyncio.sleep(delay)
                with contextlib.suppress(DockerUnavailable):
                    await self._source.connect()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)



@dataclass(frozen=True)
class OmniAmbassador:
    """The agent's omni-mode ambassador, listening, and the iptables rule that feeds it."""

    server: Ambassador
    redirect: AmbassadorRedirect


async def start_omni(config: AgentConfig, table: RouteTable,
                     stack: contextlib.AsyncExitStack) -> OmniAmbassador:
    """Listen for the containers of this host's Docker daemon (``--ambassador``).

    Names in specs resolve through the agent's RouteTable: a service's live
    (not critical) endpoints, balanced by its ``lb``. The rule is returned for the
    agent's iptables transaction, installed only once this listens.
    """
    redirect = config.ambassador_redirect(config.bridge_ip or bridge_address())
    callers = DockerCallers(DockerSource(docker_host(config.docker_host)))
    try:
        await callers.start()
    except DockerUnavailable as exc:
        raise ConfigError(f"--ambassador needs Docker: {exc}") from None
    stack.push_async_callback(callers.close)
    server = Ambassador(callers=callers, services=TableServices(table),
                        kv=KvWatchers(open_client), connect_timeout=config.connect_timeout)
    await server.start(*config.ambassador_addr)
    stack.push_async_callback(server.close)
    return OmniAmbassador(server, redirect)
