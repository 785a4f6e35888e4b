"""The registrator's life: connect, subscribe, sync, then follow events until stopped.

Startup is registrator's: ping the backend and Docker, each retried per
``-retry-attempts``/``-retry-interval`` and fatal (``StartupError``) after
that. Then, unlike registrator, a broken event stream is not fatal: the
registrator reconnects with backoff and reconciles, since missed events are
exactly what a sync repairs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from consulate.control.registrator.adapters.base import Adapter, AdapterError
from consulate.control.registrator.bridge import Bridge, BridgeConfig
from consulate.control.registrator.derive import DeriveOptions
from consulate.control.registrator.docker_source import (
    DockerSource,
    DockerUnavailable,
    EventStreamEnded,
)
from consulate.control.registrator.flags import Options

log = logging.getLogger("consulate.registrator")

RECONNECT_FIRST = 0.25  # seconds before the first reconnection attempt, doubled up to:
RECONNECT_MAX = 2.0  # as -retry-interval's default: a failed ping costs nothing


class StartupError(Exception):
    """The backend or Docker did not answer within the retries (exit status 1)."""


async def run(options: Options, *, hostname: str, docker: DockerSource, adapter: Adapter,
              stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set; closes ``adapter`` and ``docker`` on the way out."""
    try:
        await _retry(options, "Connecting to backend", adapter.ping)
        await _retry(options, f"Connecting to Docker at {docker.host}", docker.connect)
        host_ip = "" if options.ip else await _resolve(hostname)
        config = BridgeConfig(
            derive=DeriveOptions(hostname=hostname, host_ip=host_ip, ip=options.ip,
                                 internal=options.internal, explicit=options.explicit,
                                 use_ip_from_label=options.use_ip_from_label,
                                 tags=options.tags, ttl=options.ttl),
            deregister=options.deregister, cleanup=options.cleanup)
        await _Loops(Bridge(docker, adapter, config)).run(options, stop)
    finally:
        await adapter.close()
        docker.close()


async def _retry(options: Options, what: str, attempt: Callable[[], Awaitable[None]]) -> None:
    """registrator's startup loop: ``-retry-attempts`` more tries (-1: forever)."""
    limit = options.retry_attempts
    tries = 0
    while True:
        log.info("%s (%d/%d)", what, tries, limit)
        try:
            await attempt()
            return
        except (AdapterError, DockerUnavailable) as exc:
            if 0 <= limit <= tries:
                raise StartupError(str(exc)) from None
            log.warning("%s; retrying in %.1fs", exc, options.retry_interval / 1000)
        await asyncio.sleep(options.retry_interval / 1000)
        tries += 1


async def _resolve(hostname: str) -> str:
    """This host's IP by its name, which registrator gives to ports bound to 0.0.0.0."""
    try:
        return await asyncio.to_thread(socket.gethostbyname, hostname)
    except OSError:
        log.warning("cannot resolve hostname %s: ports published on 0.0.0.0 are "
                    "registered as 0.0.0.0 (pass -ip)", hostname)
        return ""


class _Loops:
    """The event loop (with reconnection) and the -resync and -ttl-refresh timers."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self._handlers: set[asyncio.Task[None]] = set()

    async def run(self, options: Options, stop: asyncio.Event) -> None:
        loops = [self._follow_events()]
        if options.resync > 0:
            loops.append(_every(options.resync, lambda: self.bridge.sync(quiet=True)))
        if options.ttl_refresh > 0:
            loops.append(_every(options.ttl_refresh, self.bridge.refresh))
        tasks = [asyncio.create_task(loop) for loop in loops]
        try:
            await stop.wait()
        finally:
            for task in [*tasks, *self._handlers]:
                task.cancel()
            await asyncio.gather(*tasks, *self._handlers, return_exceptions=True)

    async def _follow_events(self) -> None:
        delay = RECONNECT_FIRST
        first = True
        while True:
            events = self.bridge.docker.events()
            try:
                await anext(events)  # subscribed: nothing that happens from now is missed
                log.info("Listening for Docker events ...")
                await self.bridge.sync(quiet=not first)
                first, delay = False, RECONNECT_FIRST
                async for event in events:
                    if event is not None:
                        self._spawn(self.bridge.handle(event))
            except (DockerUnavailable, EventStreamEnded) as exc:
                log.warning("docker: %s; reconnecting in %.2fs, then syncing", exc, delay)
            finally:
                await events.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)
            with contextlib.suppress(DockerUnavailable):
                await self.bridge.docker.connect()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._handlers.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event handling failed", exc_info=task.exception())


async def _every(seconds: int, action: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await action()
        except Exception:  # a timer that dies would silently stop resyncing: log, go on
            log.exception("periodic %s failed", getattr(action, "__name__", "task"))
