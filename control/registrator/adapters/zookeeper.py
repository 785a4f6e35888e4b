"""``zookeeper://host:port/basepath``: ephemeral znodes, as registrator's ZooKeeper backend.

Each service is ``<basepath>/<service-name>/<ip>:<port>`` holding a JSON body
(Name, IP, PublicPort, PrivatePort, ContainerID, Tags, Attrs); the name node is
persistent and removed with its last child. Ephemeral nodes belong to the
registrator's ZooKeeper session, so a registrator that dies takes its entries
with it once the session times out; a node left by such an earlier session is
replaced rather than updated, or it would vanish with its old owner. The kazoo
client is synchronous: every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError, NotEmptyError
from kazoo.handlers.threading import KazooTimeoutError

from consulate.control.registrator.adapters.base import Adapter, AdapterError
from consulate.control.registrator.model import Service

SESSION_TIMEOUT = 10.0  # seconds; the server may shorten it (maxSessionTimeout)
CONNECT_TIMEOUT = 5.0

P = ParamSpec("P")
T = TypeVar("T")


class ZookeeperAdapter(Adapter):
    """Keys are znode paths."""

    def __init__(self, uri: str, hostname: str, host: str, port: int, base: str) -> None:
        super().__init__(uri, hostname)
        self.where = f"ZooKeeper at {host}:{port}"
        self.base = "/" + base.strip("/")
        self._client = KazooClient(hosts=f"{host}:{port}", timeout=SESSION_TIMEOUT)

    def _name_path(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    def key(self, service: Service) -> str:
        return f"{self._name_path(service.name)}/{service.ip}:{service.port}"

    async def ping(self) -> None:
        await self._call("answer", self._connect)

    async def register(self, service: Service) -> None:
        await self._call(f"store {self.key(service)}", self._write, service)

    async def refresh(self, service: Service) -> None:
        await self.register(service)

    async def remove(self, key: str) -> None:
        await self._call(f"delete {key}", self._delete, key)

    async def registered(self) -> list[str]:
        return await self._call(f"list {self.base}", self._owned)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    # -- in a worker thread ------------------------------------------------------

    def _connect(self) -> None:
        if not self._client.connected:
            self._client.start(timeout=CONNECT_TIMEOUT)
        self._client.ensure_path(self.base)

    def _write(self, service: Service) -> None:
        path = self.key(service)
        body = json.dumps({
            "Name": service.name, "IP": service.ip, "PublicPort": service.port,
            "PrivatePort": int(service.origin.exposed_port or 0),
            "ContainerID": service.origin.container_hostname,
            "Tags": list(service.tags), "Attrs": service.attrs,
        }).encode()
        try:
            self._client.create(path, body, ephemeral=True, makepath=True)
        except NodeExistsError:
            stat = self._client.exists(path)
            if stat is not None and stat.ephemeralOwner == self._session():
                self._client.set(path, body)
                return
            with contextlib.suppress(NoNodeError):
                self._client.delete(path)
            self._client.create(path, body, ephemeral=True, makepath=True)

    def _delete(self, path: str) -> None:
        with contextlib.suppress(NoNodeError):
            self._client.delete(path)
        with contextlib.suppress(NoNodeError, NotEmptyError):
            self._client.delete(path.rsplit("/", 1)[0])

    def _owned(self) -> list[str]:
        """The nodes this session created: only those are this registrator's to clean."""
        session = self._session()
        found = []
        for name in self._client.get_children(self.base):
            name_path = self._name_path(name)
            with contextlib.suppress(NoNodeError):
                for child in self._client.get_children(name_path):
                    stat = self._client.exists(f"{name_path}/{child}")
                    if stat is not None and stat.ephemeralOwner == session:
                        found.append(f"{name_path}/{child}")
        return sorted(found)

    def _session(self) -> int:
        return int(self._client.client_id[0]) if self._client.client_id else -1

    def _close(self) -> None:
        self._client.stop()
        self._client.close()

    async def _call(self, what: str, func: Callable[P, T], *args: P.args,
                    **kwargs: P.kwargs) -> T:
        try:
            return await asyncio.to_thread(func, *args, **kwargs)
        except (KazooException, KazooTimeoutError) as exc:
            raise AdapterError(f"{self.where} did not {what} ({type(exc).__name__}: {exc}): "
                               "start it or fix the registry URI") from None
