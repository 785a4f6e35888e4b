"""One registry watch, fanned out to many watchers per service.

Thousands of long polls and event streams may watch one agent. Each of them
waiting on the registry's own index would wake on every write anywhere; here a
single watch feeds the hub, which keeps every live instance, the index of the
last change of each service, and wakes only the watchers of the services a
change concerns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from consulate.control.registry.backend import RegistryBackend
from consulate.control.registry.events import ServiceEvent, ServiceView
from consulate.control.registry.model import Change, Instance
from consulate.control.tasks import cancel_and_wait

log = logging.getLogger("consulate.registry.hub")

# Events a slow stream subscriber may have pending before its stream is ended
# (it subscribes again and starts from the current set): memory stays bounded.
SUBSCRIBER_QUEUE = 1024


@dataclass
class _Service:
    view: ServiceView
    index: int = 0  # of the last change that concerned it (never 0 once it changed)
    waiters: set[asyncio.Future[None]] = field(default_factory=set)
    queues: set[asyncio.Queue[ServiceEvent | None]] = field(default_factory=set)


class WatchHub:
    """Follows ``backend.watch()`` and serves per-service waits and subscriptions."""

    def __init__(self, backend: RegistryBackend) -> None:
        self._backend = backend
        self._instances: dict[str, Instance] = {}
        self._services: dict[str, _Service] = {}
        self.index = 0
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Follow the registry; returns once the first snapshot is in."""
        self._task = asyncio.get_running_loop().create_task(self.follow())
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            self._task.result()  # the watch failed before its snapshot: raise why

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        for service in self._services.values():
            for queue in service.queues:
                queue.put_nowait(None)

    # -- reads -------------------------------------------------------------------

    def instances(self, name: str) -> tuple[list[Instance], int]:
        """A service's live instances, oldest first, and the index of its last change."""
        found = sorted((i for i in self._instances.values() if i.name == name),
                       key=lambda i: (i.create_index, i.id))
        return found, self.service_index(name)

    def service_index(self, name: str) -> int:
        """Index of the last change of ``name``; the hub's index before any (never 0)."""
        service = self._services.get(name)
        if service is not None and service.index:
            return service.index
        return max(self.index, 1)

    async def wait(self, name: str, index: int, timeout: float) -> int:
        """Block until ``name`` changes after ``index`` (or ``timeout``); its index then."""
        if self.service_index(name) > index:
            return self.service_index(name)
        service = self._service(name)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        service.waiters.add(future)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await future
        finally:
            service.waiters.discard(future)
            self._forget_if_unwatched(name, service)
        return self.service_index(name)

    async def subscribe(self, name: str) -> AsyncIterator[ServiceEvent]:
        """The service's instances, ``current``, its leader, then live events.

        Ends when the hub closes, or when the subscriber fell more than
        SUBSCRIBER_QUEUE events behind (it should subscribe again).
        """
        service = self._service(name)
        queue: asyncio.Queue[ServiceEvent | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        initial = ServiceView(name).apply(
            Change(self.service_index(name), "snapshot", tuple(self._instances.values())))
        service.queues.add(queue)  # in the same step: no change can fall in between
        try:
            for event in initial:
                yield event
            while (live := await queue.get()) is not None:
                yield live
        finally:
            service.queues.discard(queue)
            self._forget_if_unwatched(name, service)

    def stats(self) -> dict[str, int]:
        """How many services are watched, by how many long polls and streams."""
        return {"services": len(self._services),
                "waiters": sum(len(s.waiters) for s in self._services.values()),
                "streams": sum(len(s.queues) for s in self._services.values())}

    # -- the registry side ----------------------------------------------------------

    def _service(self, name: str) -> _Service:
        service = self._services.get(name)
        if service is None:
            service = self._services[name] = _Service(ServiceView(name))
            service.view.apply(Change(self.index, "snapshot", tuple(self._instances.values())))
        return service

    def _forget_if_unwatched(self, name: str, service: _Service) -> None:
        """Keep state only for watched services: any name can be asked for. A service
        asked again later starts from the hub's index, so no index goes backwards."""
        if not service.waiters and not service.queues and self._services.get(name) is service:
            del self._services[name]

    async def follow(self) -> None:
        """Apply the registry's changes until cancelled (the agent supervises it)."""
        async for change in self._backend.watch():
            self._apply(change)
            self._ready.set()

    def _apply(self, change: Change) -> None:
        self.index = max(self.index, change.index)
        concerned: set[str] = set()
        if change.kind == "snapshot":
            before = self._instances
            self._instances = {i.id: i for i in change.instances}
            concerned = ({i.name for i in before.values()} |
                         {i.name for i in self._instances.values()})
        else:
            for instance in change.instances:
                old = self._instances.pop(instance.id, None)
                if old is not None:
                    concerned.add(old.name)
                if change.kind == "up":
                    self._instances[instance.id] = instance
                concerned.add(instance.name)
        for name in concerned & self._services.keys():
            self._notify(self._services[name], change)

    def _notify(self, service: _Service, change: Change) -> None:
        events = service.view.apply(change)
        if not events:
            return  # a heartbeat, or nothing of this service changed
        service.index = change.index
        for future in service.waiters:
            if not future.done():
                future.set_result(None)
        for queue in list(service.queues):
            for event in events:
                if queue.full():  # drop the laggard rather than buffer without bound
                    service.queues.discard(queue)
                    queue.get_nowait()
                    queue.put_nowait(None)
                    break
                queue.put_nowait(event)
