"""The instances registered through this agent, kept alive and restored.

A Consul agent owns the services registered with it: it keeps them in its
local state and syncs them to the catalog (anti-entropy), and when its node
fails they go with it. consulate does the same with the registry's liveness
TTL: every instance registered through this agent's API carries the agent's
TTL and the agent heartbeats them all every TTL/3, so when the host dies or is
cut off, its instances leave every other host's routes within the TTL; when it
comes back, whatever expired meanwhile is registered again from the copy kept
here (and in ``services.json``, so that a restarted agent restores them too).

A registration made while the registry cannot be reached is kept here too, as
a Consul agent keeps it in its local state while no server answers: the next
heartbeat round that reaches the registry registers it.

An instance the registry lost although its last heartbeat is recent cannot
have expired: someone deregistered it (through another agent, or the registry
itself), so it is forgotten here rather than resurrected. Unless the registry's
index went back below the one it gave that registration: then the registry lost
its data (an etcd restarted empty, a restore from an older backup), nobody undid
anything, and the instance is registered again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from consulate.control.registry.backend import RegistryBackend
from consulate.control.registry.model import (
    Instance,
    RegistryError,
    RegistryUnavailable,
    UnknownInstance,
    instance_from_dict,
    instance_to_dict,
)
from consulate.control.tasks import cancel_and_wait

log = logging.getLogger("consulate.local")

DEFAULT_TTL = 10.0  # Discoverd's default TTL
# A lease renewed less than this share of the TTL ago cannot have run out. Renewals
# count from when they were sent (the registry renews at some moment after that), so a
# slow reply never makes an expired lease look fresh; heartbeats every third of a TTL
# find a deregistration made elsewhere well within half of it.
EXPIRY_MARGIN = 0.5


class LocalServices:
    """The agent's own registrations: liveness for each, re-registration after loss."""

    def __init__(self, registry: RegistryBackend, path: Path, ttl: float = DEFAULT_TTL, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._clock = clock
        self._renewed: dict[str, float] = {}  # id -> when the registry last confirmed it
        self._indexes: dict[str, int] = {}  # id -> the registry index of its registration
        self._path = path
        self.ttl = ttl
        self._held: dict[str, Instance] = {}
        self._deferred: set[str] = set()  # held, not yet in the registry (it was down)
        self._task: asyncio.Task[None] | None = None
        # Why heartbeats cannot reach the registry now ("" while they do): the
        # outage the agent's status reports.
        self.heartbeat_error = ""
        if path.exists():
            try:
                self._held = {i.id: i for i in map(instance_from_dict, json.loads(
                    path.read_text()))}
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.warning("event=local-services-unreadable path=%s error=%r: starting "
                            "without them (registrator's resync registers containers again)",
                            path, exc)

    def owned(self, instance: Instance) -> Instance:
        """The registration as this agent stores it: with the agent's liveness TTL."""
        return instance if instance.ttl is not None else replace(instance, ttl=self.ttl)

    def now(self) -> float:
        """The clock renewals are counted in: read it before writing a registration."""
        return self._clock()

    def added(self, instance: Instance, sent_at: float) -> None:
        """``instance`` was registered by a call sent at ``sent_at`` (``now()``)."""
        self._held[instance.id] = instance.indexed(0, 0)
        self._renewed[instance.id] = sent_at
        self._indexes[instance.id] = instance.modify_index
        self._save()

    def deferred(self, instance: Instance) -> None:
        """``instance`` could not be registered (the registry is unavailable): held, and
        registered by the first heartbeat round that reaches the registry."""
        self._held[instance.id] = instance.indexed(0, 0)
        self._renewed.pop(instance.id, None)
        self._indexes.pop(instance.id, None)
        self._deferred.add(instance.id)
        self._save()

    def removed(self, instance_id: str) -> None:
        self._deferred.discard(instance_id)
        self._renewed.pop(instance_id, None)
        self._indexes.pop(instance_id, None)
        if self._held.pop(instance_id, None) is not None:
            self._save()

    def __len__(self) -> int:
        return len(self._held)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep_alive())

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _keep_alive(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(self.ttl / 3)

    async def sync(self) -> None:
        """Heartbeat every held instance; register again the ones the registry lost."""
        for instance in list(self._held.values()):
            try:
                sent = self._clock()
                try:
                    await self._registry.heartbeat(instance.id)
                except UnknownInstance:
                    await self._lost(instance)
                else:
                    self._renewed[instance.id] = sent
            except RegistryUnavailable as exc:
                if not self.heartbeat_error:
                    log.warning("event=heartbeat-failed error=%s: retrying every %.1fs",
                                exc, self.ttl / 3)
                self.heartbeat_error = str(exc)
                return
            except RegistryError as exc:
                log.warning("event=heartbeat-failed id=%s error=%s", instance.id, exc)
        if self.heartbeat_error:
            log.info("event=heartbeat-resumed instances=%d", len(self._held))
        self.heartbeat_error = ""

    async def _lost(self, instance: Instance) -> None:
        if instance.id not in self._held:
            return  # deregistered through this agent meanwhile
        renewed = self._renewed.get(instance.id)
        reason = "the registry lost it (expired while this host was away or down)"
        if instance.id in self._deferred:
            reason = "registered through this agent while the registry was unavailable"
        elif renewed is not None and self._clock() - renewed < self.ttl * EXPIRY_MARGIN:
            known = self._indexes.get(instance.id, 0)
            _, index = await self._registry.instances(instance.name)
            if index >= known:
                self.removed(instance.id)
                log.info("event=forget id=%s service=%s reason='deregistered elsewhere: its "
                         "lease was still running'", instance.id, instance.name)
                return
            reason = f"the registry lost its data (its index went back from {known} to {index})"
        sent = self._clock()
        stored = await self._registry.register(instance)
        self._renewed[instance.id] = sent
        self._indexes[instance.id] = stored.modify_index
        self._deferred.discard(instance.id)
        log.info("event=re-register id=%s service=%s reason='%s'", instance.id, instance.name,
                 reason)

    def _save(self) -> None:
        """Write the copy atomically: a crash leaves the old file or the new one."""
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(json.dumps([instance_to_dict(i) for i in self._held.values()],
                                        sort_keys=True))
        os.replace(temporary, self._path)
