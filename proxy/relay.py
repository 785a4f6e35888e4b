"""The pure-Python relay: two asyncio protocols joined back to back.

This is the twin of the native splice engine (``consulate.native.engine``):
used with ``--relay python`` or when the extension is not built. Both pass the
same tests.

Each side writes what it reads into the other side's transport. Flow control is
the transports' own: when one side's write buffer passes its high-water mark,
asyncio calls ``pause_writing`` on that side, which pauses reading on the other,
so a slow reader never makes the agent buffer without bound. EOF is forwarded as
a half-close (see ``_forward_eof``), and the pair closes only when both directions have
ended, so a client that shuts down its writing side still gets the whole answer.
A reset on one side resets the other (``abort``), as the native engine does.

A pair starts from the client's side, made by uvloop's server when it accepts;
the upstream side joins once its socket has connected. Until then the client
side keeps what it reads and pauses reading; the joining side flushes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import cast

# Per-direction buffering the agent accepts before it stops reading the sender.
WRITE_HIGH_WATER = 256 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
EOF_RETRY_DELAY = 0.002  # seconds between checks that a buffered direction has drained
EARLY_LIMIT = 64 * 1024  # bytes a client side keeps before its upstream joins, then pauses


class RelaySide(asyncio.Protocol):
    """One end of a relay; ``peer`` is the other end.

    ``on_made`` runs when the transport exists (the proxy routes an accepted
    client there); ``on_closed`` is shared by both ends of a pair (see
    ``PythonRelay``), and ``on_bytes`` counts what this side reads.
    """

    def __init__(self, on_bytes: Callable[[int], None], on_closed: Callable[[], None],
                 peer: RelaySide | None = None,
                 on_made: Callable[[RelaySide], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.read_eof = False
        self.closed = False
        self.on_bytes = on_bytes
        self.on_closed = on_closed
        self._on_made = on_made
        self._early: list[bytes] = []
        self._early_size = 0

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            self._join(peer, self.transport)
        if self._on_made is not None:
            self._on_made(self)

    def _join(self, peer: RelaySide, transport: asyncio.Transport) -> None:
        """The second side: pair up, and pass on what the first one read meanwhile."""
        peer.peer = self
        for chunk in peer._early:
            peer.on_bytes(len(chunk))
            transport.write(chunk)
        peer._early.clear()
        if peer.closed:  # it left while we connected: deliver what it sent, then go
            transport.close()
        elif peer.read_eof:
            _forward_eof(transport)
        elif peer._early_size > EARLY_LIMIT:
            assert peer.transport is not None
            peer.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self._early.append(data)
            self._early_size += len(data)
            # A request usually fits: only a client that keeps sending before the
            # upstream is there gets paused (two epoll changes saved otherwise).
            if self._early_size > EARLY_LIMIT and self.transport is not None:
                self.transport.pause_reading()
            return
        if peer.closed:
            return
        self.on_bytes(len(data))
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.read_eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            _forward_eof(peer.transport)
            if peer.read_eof:
                self._close_pair()
        return True  # keep our writing side open: this is a half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            if exc is not None:  # propagate the reset: abort() alone would send a FIN
                reset(peer.transport)
            else:
                peer.transport.close()  # flushes what is buffered for the peer first
        if peer is None or peer.closed:
            self.on_closed()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def _close_pair(self) -> None:
        for side in (self, self.peer):
            if side is not None and side.transport is not None:
                side.transport.close()


class ClientSide(RelaySide):
    """The side a pair starts from, with the pair's end-of-life callback."""

    def __init__(self, on_bytes: Callable[[int], None], on_closed: Callable[[], None],
                 on_made: Callable[[RelaySide], None] | None = None) -> None:
        super().__init__(on_bytes, on_closed, on_made=on_made)
        self.on_done: Callable[[], None] = _nothing
        self.done = False


def reset(transport: asyncio.Transport) -> None:
    """Close with RST (SO_LINGER 0): the peer learns at once that the other end failed."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def _forward_eof(transport: asyncio.Transport) -> None:
    """Half-close ``transport`` once what is buffered for it has been sent.

    Not with ``write_eof``: uvloop 0.23 queues it as a libuv shutdown request, and
    a close() soon after (the normal end of a relay) corrupts the heap: a double
    free, reproduced with bench/minimal_proxy.py under 32 concurrent short
    connections, and gone with stock asyncio or without write_eof.
    A shutdown(2) on the descriptor acts on the connection itself, sends the FIN
    at once (so a client that got its whole answer is not left holding
    TIME_WAIT) and leaves uvloop's handle alone. uvloop's socket stand-in has no
    shutdown(), so a socket object borrows the descriptor for the call: built
    with its family and type given (no getsockopt to find them) and detached
    after, it neither duplicates nor closes it.
    """
    if transport.is_closing():
        return
    if transport.get_write_buffer_size() > 0:  # still flushing: look again shortly
        asyncio.get_running_loop().call_later(EOF_RETRY_DELAY, _forward_eof, transport)
        return
    stand_in = transport.get_extra_info("socket")
    if stand_in is None:
        return
    borrowed = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, stand_in.fileno())
    try:
        borrowed.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone already: connection_lost follows
    finally:
        borrowed.detach()


class PythonRelay:
    """Makes relay pairs and remembers the live ends, so shutdown can close them.

    A pair starts from its client side (``client``), which may read before the
    upstream exists; ``join`` adds the upstream socket once it is connected.
    ``on_closed`` runs exactly once per pair, whichever way it ends.
    """

    def __init__(self) -> None:
        self._live: set[RelaySide] = set()

    def client(self, on_made: Callable[[RelaySide], None] | None = None) -> ClientSide:
        """A client side (a protocol for an accepted connection).

        Its ``on_bytes`` and ``on_done`` can be set once it is known where the
        connection goes: the pair calls ``on_done`` once, when it is over.
        """
        side: ClientSide

        def closed() -> None:
            self._live.discard(side)
            if side.peer is not None:
                self._live.discard(side.peer)
            if not side.done:
                side.done = True
                side.on_done()

        side = ClientSide(_ignore_bytes, closed, on_made=on_made)
        self._live.add(side)
        return side

    async def join(self, client: RelaySide, to_client: Callable[[int], None], *,
                   address: tuple[str, int] | None = None,
                   sock: socket.socket | None = None) -> None:
        """Connect to ``address`` (or take the connected ``sock``) and relay it with
        ``client``; raises OSError when the connect fails, the client untouched.

        uvloop connects in C, with TCP_NODELAY, as fast as the minimal proxy does.
        """
        side = RelaySide(to_client, client.on_closed, peer=client)
        self._live.add(side)
        loop = asyncio.get_running_loop()
        try:
            if sock is not None:
                await loop.create_connection(lambda: side, sock=sock)
            else:
                assert address is not None
                await loop.create_connection(lambda: side, *address)
        except BaseException:
            if side.transport is None:
                self._live.discard(side)
            raise

    async def add(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        to_upstream: Callable[[int], None],
        to_client: Callable[[int], None],
        on_closed: Callable[[], None],
    ) -> None:
        """Relay two connected sockets; ``on_closed`` runs once, when both are closed."""
        side = self.client()
        side.on_bytes, side.on_done = to_upstream, on_closed
        await asyncio.get_running_loop().connect_accepted_socket(lambda: side, client)
        await self.join(side, to_client, sock=upstream)

    def close(self) -> None:
        """Close every live relay (a clean close: buffered bytes are flushed first)."""
        for side in list(self._live):
            if side.transport is not None:
                side.transport.close()
        self._live.clear()


def _ignore_bytes(_count: int) -> None:
    """Byte counter of a client side until the proxy knows its service."""


def _nothing() -> None:
    """End-of-life callback of a pair nobody accounts for (a refused client)."""
