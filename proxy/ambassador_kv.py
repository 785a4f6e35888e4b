"""KV keys an ambassador routes by (``consul://`` and ``etcd://`` specs), watched.

Each key is read once, when the first connection needs it, and then followed by
a watch (a Consul blocking query; an etcd v3 watch from the revision read), so
a connection never waits for the store: it uses the value last seen. Writing a
new value moves the connections made from then on; the open ones stay where
they are. A store that stops answering keeps the last value (connections keep
going where they went) and is retried with backoff; only a key that was never
read refuses connections, with the store's error as the reason.

The value itself (a spec) is parsed by the caller, with proxy/ambassador_spec.py.
The etcd client comes from the caller too (``open_etcd``): the control plane's
factory sets the channel's keepalive and reconnect policy, which proxy/ may not
import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import Callable, Sequence

import aetcd
import aetcd.exceptions
import aetcd.rtypes
import aiohttp
import consul
import consul.aio

from consulate.proxy.ambassador_spec import KvSpec

log = logging.getLogger("consulate.ambassador")

CONSUL_WAIT = "30s"  # one blocking query's longest wait (Consul's default is 5m)
REQUEST_TIMEOUT = 5.0
BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds before retrying a store, then the last


EtcdOpener = Callable[[Sequence[tuple[str, int]], float], aetcd.Client]
"""(members, timeout per call) -> a client of them."""


class KvUnavailable(Exception):
    """The key has not been read yet: the store does not answer (the message says so)."""


class KeyWatch:
    """One key's last value (None: the key does not exist), kept by ``run``."""

    def __init__(self, spec: KvSpec) -> None:
        self.spec = spec
        self.value: bytes | None = None
        self.error: str | None = None  # why the key was never read, while it was not
        self.read = asyncio.Event()  # set once the key was read, or failed to be
        self._failures = 0  # in a row, since the key was last read

    async def run(self) -> None:
        """Follow the key for ever, retrying the store with backoff when it fails."""
        while True:
            try:
                await self._follow()
            except (aiohttp.ClientError, OSError, TimeoutError, consul.ConsulException,
                    aetcd.exceptions.ClientError) as exc:
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if not self.read.is_set():
                    self.error = (f"{self.spec.uri} is not answering ({detail}): start the "
                                  "store there, or change the spec")
                    self.read.set()
                delay = BACKOFF[min(self._failures, len(BACKOFF) - 1)]
                log.warning("event=kv-unavailable key=%s retry_in=%.1f error=%r",
                            self.spec.uri, delay, detail)
                self._failures += 1
                await asyncio.sleep(delay)

    def _seen(self, value: bytes | None) -> None:
        self._failures = 0
        if value != self.value or not self.read.is_set() or self.error is not None:
            log.info("event=kv-value key=%s value=%r", self.spec.uri,
                     value.decode(errors="replace") if value is not None else None)
        self.value, self.error = value, None
        self.read.set()

    async def _follow(self) -> None:
        """Read the key, then follow its changes until the store fails (raises)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release the client."""


class ConsulKeyWatch(KeyWatch):
    def __init__(self, spec: KvSpec) -> None:
        super().__init__(spec)
        (host, port), = spec.endpoints
        with warnings.catch_warnings():
            # py-consul's asyncio client hands aiohttp its deprecated verify_ssl
            # argument; nothing of TLS is used here.
            warnings.filterwarnings("ignore", "(verify_ssl|ssl_context) is deprecated",
                                    DeprecationWarning)
            self._consul = consul.aio.Consul(host=host, port=port)

    async def _follow(self) -> None:
        index = None
        while True:
            index, data = await self._consul.kv.get(self.spec.key, index=index,
                                                    wait=CONSUL_WAIT if index else None)
            self._seen(bytes(data["Value"] or b"") if data is not None else None)

    async def close(self) -> None:
        await self._consul.http.close()


class EtcdKeyWatch(KeyWatch):
    def __init__(self, spec: KvSpec, open_etcd: EtcdOpener) -> None:
        super().__init__(spec)
        self._client = open_etcd(spec.endpoints, REQUEST_TIMEOUT)
        self._key = spec.key.encode()

    async def _follow(self) -> None:
        found = await self._client.get_prefix(self._key)
        self._seen(next((kv.value for kv in found if kv.key == self._key), None))
        watch = await self._client.watch(self._key,
                                         start_revision=int(found.header.revision) + 1)
        try:
            async for event in watch:
                deleted = event.kind == aetcd.rtypes.EventKind.DELETE
                self._seen(None if deleted else bytes(event.kv.value))
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()
        raise aetcd.exceptions.ConnectionFailedError("the watch ended")

    async def close(self) -> None:
        await self._client.close()


class KvWatchers:
    """The keys watched so far, by spec; each started by the first connection to need it."""

    def __init__(self, open_etcd: EtcdOpener, read_timeout: float = REQUEST_TIMEOUT) -> None:
        self._watches: dict[KvSpec, tuple[KeyWatch, asyncio.Task[None]]] = {}
        self._open_etcd = open_etcd
        self._read_timeout = read_timeout

    async def value(self, spec: KvSpec) -> bytes | None:
        """The key's value (None: no such key), or KvUnavailable."""
        found = self._watches.get(spec)
        if found is None:
            watch: KeyWatch = ConsulKeyWatch(spec) if spec.scheme == "consul" \
                else EtcdKeyWatch(spec, self._open_etcd)
            task = asyncio.get_running_loop().create_task(watch.run())
            self._watches[spec] = found = (watch, task)
        watch = found[0]
        try:
            async with asyncio.timeout(self._read_timeout):
                await watch.read.wait()
        except TimeoutError:
            raise KvUnavailable(f"{spec.uri} did not answer within "
                                f"{self._read_timeout:g}s") from None
        if watch.error is not None:
            raise KvUnavailable(watch.error)
        return watch.value

    async def close(self) -> None:
        for watch, task in self._watches.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await watch.close()
        self._watches.clear()

