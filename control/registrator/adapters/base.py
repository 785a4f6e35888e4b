"""The interface every registry adapter implements (registrator's RegistryAdapter).

An adapter names each entry it writes by a *key*: the service ID where the store
is a service catalog, the entry's path where it is a key-value store. The
registrator compares keys to find what to add and what is dangling, so the
adapter alone knows its store's layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from consulate.control.registrator.model import Service


class AdapterError(Exception):
    """The store refused an operation or did not answer; the message names the store."""


class Adapter(ABC):
    """One registry store, reached through the URI the registrator was given."""

    def __init__(self, uri: str, hostname: str) -> None:
        self.uri = uri
        self.hostname = hostname

    @abstractmethod
    async def ping(self) -> None:
        """Raise AdapterError unless the store answers (the startup check, retried)."""

    @abstractmethod
    async def register(self, service: Service) -> None:
        """Write ``service``; writing it again changes nothing."""

    @abstractmethod
    async def remove(self, key: str) -> None:
        """Delete the entry named ``key``; an entry already gone is not an error."""

    @abstractmethod
    async def registered(self) -> list[str]:
        """Keys of the entries this host wrote that the store holds (for -cleanup)."""

    def key(self, service: Service) -> str:
        """The key ``register`` writes ``service`` under."""
        return service.id

    async def deregister(self, service: Service) -> None:
        await self.remove(self.key(service))

    @abstractmethod
    async def refresh(self, service: Service) -> None:
        """Renew ``service``'s TTL (``-ttl-refresh``); stores without expiry ignore it."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the adapter is not used afterwards."""
