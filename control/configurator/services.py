"""The live instances of registry services, kept current by the registry's watch.

Instances are taken as the registry returns them (every field of its Instance,
whatever fields it grows) minus the indexes, which move on writes that change
nothing a template shows. While the watch is broken the last instances read
stay: an outage must not look like every instance leaving. Before the first
read there is nothing, and ``instances`` says so (ServicesUnavailable), so that
nothing renders from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from consulate.control.configurator.macros import ServicesUnavailable, instance_order
from consulate.control.registry.backend import RegistryBackend
from consulate.control.registry.model import Change, Instance, RegistryError
from consulate.control.tasks import cancel_and_wait

log = logging.getLogger("consulate.configurator.services")

RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
_VOLATILE = {"create_index", "modify_index"}


def instance_fields(instance: Instance) -> dict[str, Any]:
    fields = dataclasses.asdict(instance)
    return {key: _plain(value) for key, value in fields.items() if key not in _VOLATILE}


def _plain(value: Any) -> Any:
    """Tuples as lists, so that templates see JSON's shapes."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class ServiceFollower:
    """Follows every service's instances; ``on_change`` gets the names that moved."""

    def __init__(self, registry: RegistryBackend, describe: str,
                 on_change: Callable[[set[str]], None]) -> None:
        self.registry = registry
        self.describe = describe
        self._on_change = on_change
        self._by_id: dict[str, Instance] = {}
        self._cache: dict[str, list[dict[str, Any]]] = {}
        self.ready = asyncio.Event()
        self.error = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    @property
    def started(self) -> bool:
        return self._task is not None

    def instances(self, name: str) -> list[dict[str, Any]]:
        if not self.ready.is_set():
            raise ServicesUnavailable(f"$services {name!r}: the registry {self.describe} has "
                                      "not answered yet"
                                      + (f" ({self.error})" if self.error else ""))
        if name not in self._cache:
            self._cache[name] = sorted((instance_fields(i) for i in self._by_id.values()
                                        if i.name == name), key=instance_order)
        return self._cache[name]

    def _apply(self, change: Change) -> set[str]:
        moved = {i.name for i in change.instances}
        if change.kind == "snapshot":
            moved |= {i.name for i in self._by_id.values()}
            self._by_id = {i.id: i for i in change.instances}
        elif change.kind == "up":
            for instance in change.instances:
                old = self._by_id.get(instance.id)
                if old is not None:
                    moved.add(old.name)
                self._by_id[instance.id] = instance
        else:
            for instance in change.instances:
                self._by_id.pop(instance.id, None)
        for name in moved:
            self._cache.pop(name, None)
        return moved

    async def _follow(self) -> None:
        failures = 0
        while True:
            try:
                async for change in self.registry.watch():
                    failures = 0
                    moved = self._apply(change)
                    if change.kind == "snapshot" and not self.ready.is_set():
                        self.ready.set()
                        log.info("event=registry-ready registry=%s instances=%d",
                                 self.describe, len(self._by_id))
                    if moved:
                        self._on_change(moved)
            except RegistryError as exc:
                self.error = str(exc)
            delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
            failures += 1
            log.warning("event=registry-watch-retry registry=%s error=%r retry_in=%.1fs",
                        self.describe, self.error or "the watch ended", delay)
            await asyncio.sleep(delay)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
