"""The Python client of the registry's Discoverd API (asyncio, aiohttp).

    client = RegistryClient("http://127.0.0.1:8500")
    reg = await client.register("web", "10.0.0.5:8080", meta={"v": "2"})  # heartbeats itself
    web = await client.service_set("web")        # live set, oldest first, kept current
    reader, writer = await client.dial("web")    # a connection to a live instance
    await client.register_and_standby("jobs", "10.0.0.5:9000")  # returns once we lead
    await reg.close(); await client.close()

Every stream reconnects with backoff after the agent goes away and reports it
(``connection_events``); a ServiceSet resumes from a fresh subscription, whose
first events rebuild the set.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from consulate.control.error_text import error_text
from consulate.control.tasks import cancel_and_wait

log = logging.getLogger("consulate.registry.client")

DEFAULT_TTL = 10.0
BACKOFF = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)  # seconds between reconnects, then the last


class RegistryClientError(Exception):
    """The agent refused a request (the message is its reason) or cannot be reached."""


@dataclass(frozen=True)
class RemoteInstance:
    """An instance as the registry reports it."""

    id: str
    service: str
    addr: str
    proto: str
    tags: tuple[str, ...]
    meta: dict[str, str]
    index: int  # registration index: lower is older

    @staticmethod
    def from_json(data: dict[str, Any]) -> RemoteInstance:
        return RemoteInstance(id=data["id"], service=data["service"], addr=data["addr"],
                              proto=data["proto"], tags=tuple(data.get("tags", ())),
                              meta=dict(data.get("meta", {})), index=int(data["index"]))

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.addr.rpartition(":")
        return host, int(port)


@dataclass(frozen=True)
class Event:
    """One event of a service stream: up, update, down, current or leader; and
    ``reset`` when the stream starts again after a break (the set follows anew)."""

    kind: str
    instance: RemoteInstance | None
    index: int


class Registration:
    """A registered instance kept alive by heartbeats every TTL/2 until ``close``."""

    def __init__(self, client: RegistryClient, service: str, instance_id: str,
                 body: dict[str, Any], ttl: float) -> None:
        self.client = client
        self.service = service
        self.id = instance_id
        self._body = body
        self._ttl = ttl
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self._task = self.client._spawn(self._heartbeats())

    async def _heartbeats(self) -> None:
        """Re-PUT the same body: the registry renews it; after an outage it is
        registered again, with the same id."""
        failures = 0
        while True:
            await asyncio.sleep(self._ttl / 2 if failures == 0 else _backoff(failures))
            try:
                await self.client._put_instance(self.service, self.id, self._body)
                failures = 0
            except RegistryClientError as exc:
                failures += 1
                log.warning("event=heartbeat-failed service=%s id=%s error=%s", self.service,
                            self.id, exc)

    async def close(self) -> None:
        """Stop heartbeating and deregister."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        with contextlib.suppress(RegistryClientError):
            await self.client._request("DELETE", self.client._instance_path(self.service, self.id))


@dataclass
class ServiceSet:
    """The live instances of a service, oldest first, kept current by a stream."""

    service: str
    instances: list[RemoteInstance] = field(default_factory=list)
    leader: RemoteInstance | None = None
    _current: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _task: asyncio.Task[None] | None = None
    _rebuilding: set[str] | None = None  # ids seen since a reset, until its "current"

    def select(self, **meta: str) -> list[RemoteInstance]:
        """The instances whose meta has every given key with the given value."""
        return [i for i in self.instances if all(i.meta.get(k) == v for k, v in meta.items())]

    def filter(self, predicate: Callable[[RemoteInstance], bool]) -> list[RemoteInstance]:
        return [i for i in self.instances if predicate(i)]

    async def wait_for(self, predicate: Callable[[ServiceSet], bool], timeout: float) -> None:
        """Block until ``predicate(self)`` holds (TimeoutError after ``timeout``)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def _apply(self, event: Event) -> None:
        if event.kind in ("up", "update") and event.instance is not None:
            others = [i for i in self.instances if i.id != event.instance.id]
            self.instances = sorted([*others, event.instance], key=lambda i: (i.index, i.id))
            if self._rebuilding is not None:
                self._rebuilding.add(event.instance.id)
        elif event.kind == "down" and event.instance is not None:
            self.instances = [i for i in self.instances if i.id != event.instance.id]
        elif event.kind == "leader":
            self.leader = event.instance
        elif event.kind == "reset":
            self._rebuilding = set()
        elif event.kind == "current":
            if self._rebuilding is not None:  # what vanished during the break goes now
                self.instances = [i for i in self.instances if i.id in self._rebuilding]
                self._rebuilding = None
            self._current.set()
        async with self._changed:
            self._changed.notify_all()

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)


class RoundRobin:
    """Hands out the instances of a set in turn."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def pick(self, instances: list[RemoteInstance]) -> RemoteInstance:
        if not instances:
            raise RegistryClientError("no live instance to pick from")
        return instances[next(self._turn) % len(instances)]


def pick_random(instances: list[RemoteInstance]) -> RemoteInstance:
    if not instances:
        raise RegistryClientError("no live instance to pick from")
    return random.choice(instances)


class RegistryClient:
    """Talks to one agent's Discoverd API."""

    def __init__(self, url: str = "http://127.0.0.1:8500", *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._timeout = timeout
        self.connection_events: asyncio.Queue[str] = asyncio.Queue(256)
        self._tasks: set[asyncio.Task[None]] = set()  # heartbeats and set followers
        self._closed = False

    # -- plumbing ----------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RegistryClientError(f"the client of {self.url} is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout))
        return self._session

    @staticmethod
    def _instance_path(service: str, instance_id: str) -> str:
        return f"/v1/discover/services/{service}/instances/{instance_id}"

    async def _request(self, method: str, path: str, body: object = None) -> Any:
        try:
            async with self._http().request(
                    method, self.url + path, data=None if body is None else json.dumps(body),
                    timeout=aiohttp.ClientTimeout(total=self._timeout)) as response:
                text = await response.text()
                if response.status != 200:
                    raise RegistryClientError(f"{method} {path}: {response.status} {text.strip()}")
                return json.loads(text) if text else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegistryClientError(f"agent at {self.url} cannot be reached: "
                                      f"{error_text(exc)}") from None

    async def _put_instance(self, service: str, instance_id: str, body: dict[str, Any]) -> Any:
        return await self._request("PUT", self._instance_path(service, instance_id), body)

    def _signal(self, what: str) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.connection_events.put_nowait(what)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run background work that ``close`` stops (a task finished is forgotten)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Stop every heartbeat and stream this client started, then its connections.
        Registrations not closed first are not deregistered: they expire after their
        TTL, as when the process ends. Event streams end; later calls raise
        RegistryClientError."""
        self._closed = True
        for task in list(self._tasks):
            await cancel_and_wait(task)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- registering -----------------------------------------------------------------

    async def register(self, service: str, addr: str, *, meta: dict[str, str] | None = None,
                       tags: list[str] | None = None, proto: str = "tcp",
                       ttl: float = DEFAULT_TTL, instance_id: str | None = None) -> Registration:
        """Register and keep the instance alive until the Registration is closed."""
        body = {"addr": addr, "proto": proto, "meta": meta or {}, "tags": tags or [],
                "ttl": f"{ttl}s"}
        instance_id = instance_id or uuid.uuid4().hex
        await self._put_instance(service, instance_id, body)
        registration = Registration(self, service, instance_id, body, ttl)
        registration._start()
        return registration

    async def register_and_standby(self, service: str, addr: str,
                                   **options: Any) -> Registration:
        """Register, then return once this instance is the service's leader."""
        registration = await self.register(service, addr, **options)
        async for event in self.events(service, kinds={"leader"}):
            if event.instance is not None and event.instance.id == registration.id:
                return registration
        raise RegistryClientError("the event stream ended")  # events() only ends on close

    # -- watching --------------------------------------------------------------------

    async def instances(self, service: str) -> list[RemoteInstance]:
        data = await self._request("GET", f"/v1/discover/services/{service}/instances")
        return [RemoteInstance.from_json(i) for i in data]

    async def events(self, service: str, kinds: set[str] | None = None) -> AsyncIterator[Event]:
        """The service's event stream, reconnecting with backoff when it breaks.

        After a reconnect the stream starts again with the current set (up events
        and ``current``), so a consumer that keeps state rebuilds it. It ends when
        the client is closed.
        """
        failures = 0
        path = f"{self.url}/v1/discover/services/{service}/instances"
        while not self._closed:
            try:
                async with self._http().get(
                        path, headers={"Accept": "text/event-stream"}) as response:
                    if response.status != 200:
                        raise RegistryClientError(f"GET {path}: {response.status}")
                    if failures:
                        self._signal("reconnected")
                        if kinds is None:
                            yield Event("reset", None, 0)
                    failures = 0
                    async for event in _sse_events(response.content):
                        if kinds is None or event.kind in kinds:
                            yield event
            except (aiohttp.ClientError, RegistryClientError) as exc:
                if self._closed:
                    return
                if failures == 0:
                    self._signal("disconnected")
                log.warning("event=stream-broken service=%s error=%s", service, exc)
            failures += 1
            await asyncio.sleep(_backoff(failures))

    async def service_set(self, service: str, *, timeout: float = 10.0) -> ServiceSet:
        """A set kept current in the background; returns once it holds the whole set."""
        found = ServiceSet(service)

        async def follow() -> None:
            async for event in self.events(service):
                await found._apply(event)

        found._task = self._spawn(follow())
        try:
            async with asyncio.timeout(timeout):
                await found._current.wait()
        except BaseException:  # timed out or cancelled: the follower goes too
            await cancel_and_wait(found._task)
            raise
        return found

    async def leaders(self, service: str) -> AsyncIterator[RemoteInstance | None]:
        """The service's leader now, then each new one (None: no instance left)."""
        async for event in self.events(service, kinds={"leader"}):
            yield event.instance

    async def dial(self, service: str, *, pick: Callable[[list[RemoteInstance]], RemoteInstance]
                   = pick_random) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to a live instance of ``service`` (the others tried on failure)."""
        candidates = await self.instances(service)
        errors: list[str] = []
        while candidates:
            chosen = pick(candidates)
            candidates = [i for i in candidates if i.id != chosen.id]
            try:
                return await asyncio.open_connection(*chosen.host_port)
            except OSError as exc:
                errors.append(f"{chosen.addr}: {exc.strerror or exc}")
        raise RegistryClientError(f"no live instance of {service!r} accepted a connection"
                                  + (f" ({'; '.join(errors)})" if errors else ""))


async def _sse_events(content: aiohttp.StreamReader) -> AsyncIterator[Event]:
    fields: dict[str, str] = {}
    async for raw in content:
        line = raw.decode().rstrip("\r\n")
        if line:
            key, _, value = line.partition(":")
            fields[key] = value.removeprefix(" ")
            continue
        if "event" in fields:
            data = json.loads(fields.get("data", "null"))
            yield Event(fields["event"], RemoteInstance.from_json(data) if data else None,
                        int(fields.get("id", "0")))
        fields = {}


def _backoff(failures: int) -> float:
    """Delay before retry ``failures``, with jitter so that clients do not sync up."""
    base = BACKOFF[min(failures, len(BACKOFF)) - 1]
    return base * random.uniform(0.8, 1.2)
