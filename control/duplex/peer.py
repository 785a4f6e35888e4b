"""A peer: binds and connects to many endpoints, opens and accepts channels.

There is no broker and no client/server split: any peer may bind (listen) on
some endpoints and connect (dial, and redial with backoff) to others, and once
connected the two ends are equal: either may open channels to the other. Opens
go round robin over the connected peers, or to one chosen peer; an open made
while nobody is connected waits (up to ``open_timeout``) for the first one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import Callable
from types import TracebackType

from .backoff import Backoff
from .channel import DEFAULT_HWM, Channel, State
from .connection import Connection, RemotePeer
from .endpoints import Endpoint, dial, listen, parse, remove_socket_file
from .errors import NoPeerError, PeerClosedError
from .frames import DEFAULT_MAX_FRAME_SIZE

log = logging.getLogger(__name__)

Handler = Callable[[Channel], None]


class Peer:
    """One participant of a Duplex mesh.

    ``handler``: called with each channel the other side opens, as soon as its
    OPEN frame arrives (it must not block: start a task for long work). Without
    one, channels queue for :meth:`accept`. ``hwm``: per-channel high-water mark
    of received messages (reading from the connection pauses while any of its
    channels holds that many), also the limit of live channels a remote may have
    open on one connection. ``open_timeout``: how long an :meth:`open` waits for
    a first connection before failing with NoPeerError.
    """

    def __init__(self, name: str | None = None, *, handler: Handler | None = None,
                 hwm: int = DEFAULT_HWM, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 open_timeout: float = 10.0, greeting_timeout: float = 5.0,
                 backoff: Callable[[], Backoff] = Backoff) -> None:
        if hwm < 2:
            raise ValueError(f"hwm must be at least 2, got {hwm}")
        self.id = str(uuid.uuid4())
        self.name = name if name is not None else socket.gethostname()
        self.handler = handler
        self.open_timeout = open_timeout
        self._hwm = hwm
        self._max_frame_size = max_frame_size
        self._greeting_timeout = greeting_timeout
        self._backoff = backoff
        self._servers: dict[str, asyncio.Server] = {}
        self._dialers: dict[str, asyncio.Task[None]] = {}
        self._dial_errors: dict[str, str] = {}
        self._all: set[Connection] = set()  # connected, greeted or not
        self._ready: list[Connection] = []  # greeted: the round-robin ring
        self._rr = 0
        self._waiting: dict[Channel, asyncio.TimerHandle] = {}  # opens without a peer yet
        self._accepted: list[Channel] = []
        self._acceptors: list[asyncio.Future[None]] = []
        self._watchers: list[asyncio.Future[None]] = []  # woken on changes (peers, channels)
        self._closed = False

    def __repr__(self) -> str:
        return f"<Peer {self.name!r} {self.id}>"

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.shutdown()

    # -- endpoints ----------------------------------------------------------------

    async def bind(self, uri: str) -> str:
        """Listen on an endpoint; returns its URI as bound (a tcp port 0 resolved)."""
        self._check_open()
        endpoint = parse(uri)
        # The factory runs per accepted connection, after listen() has returned, so
        # it sees the endpoint as bound (a tcp port 0 resolved).
        server, bound = await listen(endpoint, lambda: self._connection(bound, False))
        self._servers[str(bound)] = server
        log.info("duplex bound peer=%s endpoint=%s", self.name, bound)
        return str(bound)

    async def unbind(self, uri: str) -> None:
        """Stop listening on an endpoint bound before (the URI :meth:`bind` returned).
        Connections accepted on it stay up: :meth:`drop` ends them."""
        key = str(parse(uri))
        server = self._servers.pop(key, None)
        if server is None:
            raise ValueError(f"{uri!r} is not bound by peer {self.name!r}; bound: "
                             f"{', '.join(self._servers) or 'nothing'}")
        server.close()
        if key.startswith("unix://"):
            remove_socket_file(key[len("unix://"):])
        log.info("duplex unbound peer=%s endpoint=%s", self.name, key)

    async def connect(self, uri: str) -> None:
        """Dial an endpoint, now and whenever the connection is lost, with backoff
        and jitter, until :meth:`disconnect` or :meth:`shutdown`. Returns at once:
        opens wait for the connection (see ``open_timeout``)."""
        self._check_open()
        endpoint = parse(uri)
        key = str(endpoint)
        if key in self._dialers:
            raise ValueError(f"peer {self.name!r} already connects to {key}")
        self._dialers[key] = asyncio.create_task(self._dial_forever(endpoint),
                                                 name=f"duplex-dial {key}")

    async def disconnect(self, uri: str) -> None:
        """Stop dialing an endpoint and close the connection made through it."""
        key = str(parse(uri))
        task = self._dialers.pop(key, None)
        if task is None:
            raise ValueError(f"peer {self.name!r} does not connect to {key}; it connects to: "
                             f"{', '.join(self._dialers) or 'nothing'}")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._dial_errors.pop(key, None)
        closing = [conn for conn in self._all if conn.outgoing and conn.endpoint == key]
        for conn in closing:
            conn.close(f"disconnected from {key}")
        if closing:
            await asyncio.wait([conn.lost for conn in closing])

    async def _dial_forever(self, endpoint: Endpoint) -> None:
        key, backoff, failures = str(endpoint), self._backoff(), 0
        while True:
            try:
                conn = await self._dial(endpoint)
            except OSError as exc:
                failures += 1
                self._dial_errors[key] = str(exc)
                # the first failure in a row is news; the next ones only repeat it
                log.log(logging.INFO if failures == 1 else logging.DEBUG,
                        "duplex dial failed peer=%s endpoint=%s attempt=%d error=%s",
                        self.name, key, failures, exc)
            else:
                await asyncio.shield(conn.lost)  # cancelling this task must not cancel it
                if conn.remote is not None:  # it worked for a while: start over quickly
                    failures = 0
                    backoff.reset()
            await asyncio.sleep(backoff.next())

    async def _dial(self, endpoint: Endpoint) -> Connection:
        made: list[Connection] = []

        def factory() -> Connection:
            made.append(self._connection(endpoint, True))
            return made[0]

        await dial(endpoint, factory)
        self._dial_errors.pop(str(endpoint), None)
        return made[0]

    def _connection(self, endpoint: Endpoint, outgoing: bool) -> Connection:
        return Connection(self, str(endpoint), outgoing=outgoing, hwm=self._hwm,
                          max_frame_size=self._max_frame_size,
                          greeting_timeout=self._greeting_timeout)

    # -- peers --------------------------------------------------------------------

    def peers(self) -> list[RemotePeer]:
        """The connected peers, one entry per connection, in round-robin order."""
        return [conn.remote for conn in self._ready if conn.remote is not None]

    async def wait_for_peers(self, count: int = 1, timeout: float | None = None
                             ) -> list[RemotePeer]:
        """Wait until at least ``count`` connections are up; TimeoutError if not in time."""
        async with asyncio.timeout(timeout):
            while len(self._ready) < count:
                await self._changed()
        return self.peers()

    def drop(self, peer: RemotePeer | str) -> int:
        """Close every connection to a peer (a RemotePeer, its id or its name); its
        channels fail with ConnectionLost on both sides. A connection this peer
        dialed is redialed (:meth:`disconnect` stops that). Returns how many closed."""
        conns = self._connections_of(peer)
        for conn in conns:
            conn.close(f"dropped by {self.name}")
        return len(conns)

    def _connections_of(self, peer: RemotePeer | str) -> list[Connection]:
        key = peer.id if isinstance(peer, RemotePeer) else peer
        found = [c for c in self._ready if c.remote is not None and c.remote.id == key]
        if not found:
            found = [c for c in self._ready if c.remote is not None and c.remote.name == key]
            if len({c.remote.id for c in found if c.remote is not None}) > 1:
                raise ValueError(f"peer name {key!r} is ambiguous: several peers have it; "
                                 "use a peer id from peers()")
        if not found:
            known = ", ".join(f"{p.name} ({p.id})" for p in self.peers()) or "none"
            raise NoPeerError(f"no connected peer {key!r} (connected: {known})")
        return found

    # -- channels -----------------------------------------------------------------

    def open(self, method: str, payload: bytes | None = None, *, last: bool = False,
             headers: dict[str, str] | None = None, timeout: float | None = None) -> Channel:
        """Open a channel on the next connected peer (round robin). ``payload`` and
        ``last`` go with the OPEN frame. With no peer connected, the channel waits
        for one up to ``timeout`` (default ``open_timeout``), then fails with
        NoPeerError (raised by its receive/send)."""
        self._check_open()
        channel = Channel(method, headers, hwm=self._hwm)
        channel._start(payload, last)
        if self._ready:
            conn = self._ready[self._rr % len(self._ready)]
            self._rr += 1
            conn.attach(channel)
        else:
            wait = self.open_timeout if timeout is None else timeout
            self._waiting[channel] = asyncio.get_running_loop().call_later(
                wait, self._no_peer, channel, wait)
        return channel

    def open_with(self, peer: RemotePeer | str, method: str, payload: bytes | None = None, *,
                  last: bool = False, headers: dict[str, str] | None = None) -> Channel:
        """Open a channel on one given peer (a RemotePeer, its id or its name);
        NoPeerError at once if it is not connected."""
        self._check_open()
        conn = self._connections_of(peer)[0]
        channel = Channel(method, headers, hwm=self._hwm)
        channel._start(payload, last)
        conn.attach(channel)
        return channel

    async def accept(self) -> tuple[str, Channel]:
        """The next channel the other side opened, with its method."""
        if self.handler is not None:
            raise RuntimeError(f"peer {self.name!r} gives its channels to its handler "
                               f"({self.handler!r}): accept() would never return")
        while not self._accepted:
            self._check_open()
            waiter = asyncio.get_running_loop().create_future()
            self._acceptors.append(waiter)
            await waiter
        channel = self._accepted.pop(0)
        return channel.method, channel

    def _no_peer(self, channel: Channel, waited: float) -> None:
        self._waiting.pop(channel, None)
        if self._dialers or self._servers:
            where = "; ".join([*(f"bound to {uri}" for uri in self._servers),
                               *(f"connecting to {uri}" +
                                 (f" (last error: {self._dial_errors[uri]})"
                                  if uri in self._dial_errors else "")
                                 for uri in self._dialers)])
        else:
            where = "it neither binds nor connects: call bind() or connect() first"
        channel._abort(NoPeerError(f"no peer connected within {waited:g} s to open "
                                   f"{channel.method!r} on peer {self.name!r}: {where}"),
                       discard=True)

    # -- shutting down ------------------------------------------------------------

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop listening and dialing, refuse new channels, let the open ones finish
        (up to ``timeout`` seconds), then close every connection."""
        if self._closed:
            return
        self._closed = True
        for uri in list(self._servers):
            await self.unbind(uri)
        for task in self._dialers.values():
            task.cancel()
        for task in self._dialers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._dialers.clear()
        for channel, timer in self._waiting.items():
            timer.cancel()
            channel._abort(PeerClosedError(f"peer {self.name!r} shut down before a peer "
                                           "connected"), discard=True)
        self._waiting.clear()
        self._wake(self._acceptors)
        for channel in self._accepted:
            channel.interrupt(f"peer {self.name!r} is shutting down")
        self._accepted.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while any(conn.channels for conn in self._all):
                    await self._changed()
        conns = list(self._all)
        for conn in conns:
            conn.close(f"peer {self.name!r} shut down")
        if conns:
            await asyncio.wait([conn.lost for conn in conns], timeout=timeout)
        log.info("duplex shut down peer=%s", self.name)

    def _check_open(self) -> None:
        if self._closed:
            raise PeerClosedError(f"peer {self.name!r} was shut down")

    # -- what connections report (connection.Owner) ------------------------------

    def _connection_made(self, conn: Connection) -> None:
        # Not when the protocol is created: uvloop creates it before connecting,
        # and a dial that fails never makes it.
        self._all.add(conn)
        conn.lost.add_done_callback(lambda _: self._all.discard(conn))

    def _connection_ready(self, conn: Connection) -> None:
        if self._closed:
            conn.close(f"peer {self.name!r} is shutting down")
            return
        self._ready.append(conn)
        while self._waiting:
            channel = next(iter(self._waiting))
            self._waiting.pop(channel).cancel()
            if channel.state is not State.ABORTED:  # interrupted while it waited
                target = self._ready[self._rr % len(self._ready)]
                self._rr += 1
                target.attach(channel)
        self._wake(self._watchers)

    def _channel_opened(self, conn: Connection, channel: Channel) -> None:
        if channel.state is State.ABORTED:  # an OPEN that was also an interrupt
            return
        if self._closed:
            channel.interrupt(f"peer {self.name!r} is shutting down")
        elif self.handler is not None:
            try:
                self.handler(channel)
            except Exception as exc:  # a bug in the handler must not kill the connection
                log.exception("duplex handler failed peer=%s method=%s", self.name,
                              channel.method)
                channel.interrupt(f"handler failed: {type(exc).__name__}: {exc}")
        else:
            self._accepted.append(channel)
            self._wake(self._acceptors)

    def _channel_ended(self) -> None:
        if self._closed:
            self._wake(self._watchers)

    def _connection_lost(self, conn: Connection) -> None:
        if conn in self._ready:
            self._ready.remove(conn)
            assert conn.remote is not None
            log.info("duplex disconnected peer=%s remote=%s id=%s endpoint=%s", self.name,
                     conn.remote.name, conn.remote.id, conn.endpoint)
        self._wake(self._watchers)

    # -- waiting for changes ------------------------------------------------------

    async def _changed(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._watchers.append(waiter)
        await waiter

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        waiters.clear()
