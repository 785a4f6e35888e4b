"""Keeps a registry equal to this host's running containers (registrator's bridge).

Events and full syncs both land here. Work on one container is serialised by a
lock of its own, in arrival order, so a ``die`` never overtakes the ``start``
before it, while different containers proceed concurrently (100 containers
started together register in parallel). A container's services are recorded
before they are registered and forgotten before they are deregistered, so a
cleanup running meanwhile never takes a fresh registration for a dangling one.

Beyond registrator, a sync also settles containers it knows that are no longer
running (their ``die`` was missed while the event stream was down), so a
dockerd restart leaves no ghosts even without ``-cleanup``; ``-cleanup`` adds
the removal of this host's registrations that no known container explains
(left by an earlier registrator process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from consulate.control.registrator.adapters.base import Adapter, AdapterError
from consulate.control.registrator.derive import DeriveOptions, derive
from consulate.control.registrator.docker_source import (
    ContainerEvent,
    DockerSource,
    DockerUnavailable,
)
from consulate.control.registrator.model import Service, short_id

log = logging.getLogger("consulate.registrator")

SIGNALLED = 0x80  # exit codes of processes killed by a signal have this bit (128 + signo)


@dataclass(frozen=True)
class BridgeConfig:
    derive: DeriveOptions
    deregister: str = "always"  # or "on-success"
    cleanup: bool = False


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class Bridge:
    """The registrator's memory: which services each running container has."""

    def __init__(self, docker: DockerSource, adapter: Adapter, config: BridgeConfig) -> None:
        self.docker = docker
        self.adapter = adapter
        self.config = config
        self.services: dict[str, list[Service]] = {}
        # Containers that failed under -deregister on-success: still registered,
        # not refreshed, deregistered when the container is removed.
        self.retained: dict[str, list[Service]] = {}
        # What the store refused (it was down): retried at every sync, so nothing is
        # lost while it is away.
        self.unregistered: set[str] = set()  # service ids
        self.undeleted: dict[str, tuple[str, Service]] = {}  # key -> (container, service)
        self._slots: dict[str, _Slot] = {}
        self._sync_lock = asyncio.Lock()

    # -- events ------------------------------------------------------------------

    async def handle(self, event: ContainerEvent) -> None:
        """One Docker event: start registers, die deregisters, destroy drops what
        on-success kept."""
        async with self._container(event.container_id):
            try:
                if event.action == "start":
                    await self._add(event.container_id, quiet=False)
                elif event.action == "die":
                    await self._exited(event.container_id)
                else:
                    await self._destroyed(event.container_id)
            except DockerUnavailable as exc:
                log.warning("unable to inspect container: %s %s",
                            short_id(event.container_id), exc)

    # -- syncs and timers ----------------------------------------------------------

    async def sync(self, quiet: bool) -> None:
        """Register every running container's services, settle the ones that stopped,
        and with -cleanup remove dangling registrations.

        Raises DockerUnavailable when the containers cannot be listed, unless
        ``quiet`` (a periodic resync, which then skips this round).
        """
        async with self._sync_lock:
            try:
                running = await self.docker.running()
            except DockerUnavailable as exc:
                if not quiet:
                    raise
                log.warning("error listing containers, skipping sync: %s", exc)
                return
            log.info("Syncing services on %d containers", len(running))
            await asyncio.gather(*(self._sync_one(cid, quiet) for cid in running))
            listed = set(running)
            stopped = [cid for cid in [*self.services, *self.retained] if cid not in listed]
            await asyncio.gather(*(self._settle(cid) for cid in stopped))
            await self._retry_removals()
            if self.config.cleanup:
                await self._cleanup()

    async def refresh(self) -> None:
        """Renew the TTL of every running container's services (``-ttl-refresh``)."""
        for cid, services in list(self.services.items()):
            for service in services:
                try:
                    await self.adapter.refresh(service)
                except AdapterError as exc:
                    log.warning("refresh failed: %s %s", service.id, exc)
                    continue
                log.info("refreshed: %s %s", short_id(cid), service.id)

    # -- per container, under its lock ---------------------------------------------

    async def _sync_one(self, cid: str, quiet: bool) -> None:
        async with self._container(cid):
            known = self.services.get(cid)
            if known is None:
                try:
                    await self._add(cid, quiet)
                except DockerUnavailable as exc:
                    log.warning("unable to inspect container: %s %s", short_id(cid), exc)
                return
            for service in known:
                await self._register(cid, service, first=False)

    async def _add(self, cid: str, quiet: bool) -> None:
        if cid in self.services:
            log.debug("container %s already registered, ignoring", short_id(cid))
            return
        container = await self.docker.inspect(cid)
        if container is None or not _running(container):
            return  # gone again: its die event follows, or already came
        self.retained.pop(cid, None)  # restarted after failing: registered afresh below
        derivation = derive(container, self.config.derive)
        if not quiet:
            for note in derivation.notes:
                log.info("%s", note)
        self.services[cid] = list(derivation.services)
        for service in derivation.services:
            await self._register(cid, service, first=True)

    async def _register(self, cid: str, service: Service, *, first: bool) -> None:
        """Register (again, at a sync); "added:" when it lands for the first time,
        which for a registration that waited for the store is at a later sync."""
        try:
            await self.adapter.register(service)
        except AdapterError as exc:
            self.unregistered.add(service.id)  # still recorded: the next sync retries
            log.warning("%s: %s %s", "register failed" if first else "sync register failed",
                        service.id, exc)
            return
        if first or service.id in self.unregistered:
            self.unregistered.discard(service.id)
            log.info("added: %s %s", short_id(cid), service.id)

    async def _exited(self, cid: str) -> None:
        services = self.services.get(cid)
        if services is None:
            return
        if await self._should_deregister(cid):
            del self.services[cid]
            await self._deregister_all(cid, services)
        else:
            self.retained[cid] = self.services.pop(cid)

    async def _destroyed(self, cid: str) -> None:
        services = self.services.pop(cid, None) or self.retained.pop(cid, None)
        if services:
            await self._deregister_all(cid, services)

    async def _settle(self, cid: str) -> None:
        """A known container missing from the running list: started since the list
        was taken (keep it), exited (as its die event), or removed."""
        async with self._container(cid):
            try:
                container = await self.docker.inspect(cid)
            except DockerUnavailable as exc:
                log.warning("unable to inspect container: %s %s", short_id(cid), exc)
                return
            if container is None:
                await self._destroyed(cid)
            elif not _running(container):
                await self._exited(cid)

    async def _should_deregister(self, cid: str) -> bool:
        """-deregister: always, or on-success (exit code 0 or killed by a signal)."""
        if self.config.deregister == "always":
            return True
        try:
            container = await self.docker.inspect(cid)
        except DockerUnavailable as exc:
            log.warning("registrator: error fetching status for container %s on \"die\" "
                        "event: %s", short_id(cid), exc)
            return False
        if container is None:
            log.info("registrator: container %s was removed, could not fetch exit code",
                     short_id(cid))
            return True
        if _running(container):
            log.info("registrator: not removing container %s, still running", short_id(cid))
            return False
        code = int(container.get("State", {}).get("ExitCode", 0))
        return code == 0 or code & SIGNALLED == SIGNALLED

    async def _deregister_all(self, cid: str, services: list[Service]) -> None:
        for service in services:
            self.unregistered.discard(service.id)
            try:
                await self.adapter.deregister(service)
            except AdapterError as exc:
                self.undeleted[self.adapter.key(service)] = (cid, service)
                log.warning("deregister failed: %s %s", service.id, exc)
                continue
            log.info("removed: %s %s", short_id(cid), service.id)

    async def _retry_removals(self) -> None:
        wanted = self._wanted()
        for key, (cid, service) in list(self.undeleted.items()):
            del self.undeleted[key]
            if key not in wanted:  # unless its container came back meanwhile
                await self._deregister_all(cid, [service])

    def _wanted(self) -> set[str]:
        """Keys of every service a known container explains."""
        return {self.adapter.key(service)
                for services in [*self.services.values(), *self.retained.values()]
                for service in services}

    async def _cleanup(self) -> None:
        log.info("Cleaning up dangling services")
        try:
            keys = await self.adapter.registered()
        except AdapterError as exc:
            log.warning("cleanup failed: %s", exc)
            return
        wanted = self._wanted()  # after reading the store: a newer service is recorded
        for key in keys:
            if key in wanted:
                continue
            log.info("dangling: %s", key)
            try:
                await self.adapter.remove(key)
            except AdapterError as exc:
                log.warning("deregister failed: %s %s", key, exc)
                continue
            log.info("%s removed", key)

    @contextlib.asynccontextmanager
    async def _container(self, cid: str) -> AsyncIterator[None]:
        """Hold ``cid``'s lock; the lock is dropped when nobody holds or waits for it."""
        slot = self._slots.setdefault(cid, _Slot())
        slot.users += 1
        try:
            async with slot.lock:
                yield
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._slots[cid]


def _running(container: dict[str, Any]) -> bool:
    return bool((container.get("State") or {}).get("Running"))
