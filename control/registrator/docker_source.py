"""The Docker daemon as the registrator sees it: containers and their start/die events.

The docker SDK is synchronous: calls run in worker threads, and the event stream
is read by one thread that hands events to the event loop. A stream that ends
(dockerd stopped or restarted) surfaces as ``EventStreamEnded``, for the caller
to reconnect and reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
EVENTS = ("start", "die", "destroy")
CALL_TIMEOUT = 30  # seconds; inspecting is quick, but dockerd can be slow under load

T = TypeVar("T")


class DockerUnavailable(Exception):
    """dockerd did not answer; the message names the socket and what to do."""


class EventStreamEnded(Exception):
    """The event stream closed, as it does when dockerd stops."""


@dataclass(frozen=True)
class ContainerEvent:
    action: str  # one of EVENTS
    container_id: str


def docker_host(explicit: str = "") -> str:
    """Where dockerd listens: ``explicit``, else DOCKER_HOST, else the local socket."""
    return explicit or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


class DockerSource:
    """One daemon, by its ``DOCKER_HOST``-style URL."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._api: docker.APIClient | None = None

    async def connect(self) -> None:
        """Open the API client (negotiating the API version) and ping the daemon."""
        def open_and_ping() -> None:
            if self._api is None:
                self._api = docker.APIClient(base_url=self.host, version="auto",
                                             timeout=CALL_TIMEOUT)
            self._api.ping()

        await self._call(open_and_ping)

    async def running(self) -> list[str]:
        """IDs of the running containers."""
        listed = await self._call(lambda: self._client().containers(quiet=True))
        return [str(item["Id"]) for item in listed]

    async def inspect(self, container_id: str) -> dict[str, Any] | None:
        """The container's inspect data, or None when it no longer exists."""
        def inspect() -> dict[str, Any] | None:
            try:
                return dict(self._client().inspect_container(container_id))
            except docker.errors.NotFound:
                return None

        return await self._call(inspect)

    async def events(self) -> AsyncGenerator[ContainerEvent | None, None]:
        """Container events from now on. The first value is None, yielded once the
        daemon has accepted the subscription: a sync started after it misses nothing."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
        stream = await self._call(lambda: self._client().events(
            decode=True, filters={"type": "container", "event": list(EVENTS)}))

        def pump() -> None:
            end: BaseException | None = None
            try:
                for item in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except Exception as exc:  # the connection broke: report it, do not die silently
                end = exc
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(queue.put_nowait, end or None)

        reader = threading.Thread(target=pump, name="docker-events", daemon=True)
        reader.start()
        try:
            yield None
            while True:
                item = await queue.get()
                if item is None or isinstance(item, BaseException):
                    raise EventStreamEnded(f"the event stream of {self.host} closed"
                                           + (f" ({item})" if item else ""))
                action, container_id = item.get("status"), item.get("id")
                if action in EVENTS and container_id:
                    yield ContainerEvent(str(action), str(container_id))
        finally:
            stream.close()

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    def _client(self) -> docker.APIClient:
        if self._api is None:
            raise DockerUnavailable(f"not connected to Docker at {self.host}")
        return self._api

    async def _call(self, func: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(func)
        except (docker.errors.DockerException, requests.exceptions.RequestException,
                OSError) as exc:
            raise DockerUnavailable(
                f"Docker at {self.host} is not answering ({type(exc).__name__}: {exc}): "
                "start dockerd, or point DOCKER_HOST (--docker-host) at its socket") from None
