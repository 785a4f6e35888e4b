"""The pure-Python relay: two asyncio protocols joined back to back.

This is the twin of the native splice engine (``consulate.native.engine``):
used with ``--relay python``, when the extension is not built, or when the engine
declines a connection. Both pass the same tests.

Each side writes what it reads into the other side's transport. Flow control is
the transports' own: when one side's write buffer passes its high-water mark,
asyncio calls ``pause_writing`` on that side, which pauses reading on the other,
so a slow reader never makes the agent buffer without bound. EOF is forwarded as
a half-close (see ``_forward_eof``), and the pair closes only when both directions have
ended, so a client that shuts down its writing side still gets the whole answer.
A reset on one side resets the other (``abort``), as the native engine does.

Both sockets are connected before the transports exist. The first side created
may read before its peer exists (uvloop starts reading right after
``connection_made``): it keeps those bytes and pauses, and the second side
flushes them when it joins.
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


class RelaySide(asyncio.Protocol):
    """One end of a relay; ``peer`` is the other end."""

    def __init__(self, on_bytes: Callable[[int], None], on_closed: Callable[[], None],
                 peer: RelaySide | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.read_eof = False
        self.closed = False
        self._on_bytes = on_bytes
        self._on_closed = on_closed
        self._early: list[bytes] = []

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.peer = self  # the second side: join the pair
            for chunk in peer._early:
                peer._on_bytes(len(chunk))
                self.transport.write(chunk)
            peer._early.clear()
            if peer.read_eof:
                _forward_eof(self.transport)
            else:
                peer.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self._early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if peer.closed:
            return
        self._on_bytes(len(data))
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
                sock = peer.transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                peer.transport.abort()
            else:
                peer.transport.close()  # flushes what is buffered for the peer first
        if peer is None or peer.closed:
            self._on_closed()

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


def _forward_eof(transport: asyncio.Transport) -> None:
    """Half-close ``transport`` once what is buffered for it has been sent.

    Not with ``write_eof``: uvloop 0.23 queues it as a libuv shutdown request, and
    a close() soon after (the normal end of a relay) corrupts the heap: a double
    free, reproduced with bench/minimal_proxy.py under 32 concurrent short
    connections, and gone with stock asyncio or without write_eof.
    A shutdown(2) on a duplicate of the descriptor acts on the connection itself,
    sends the FIN at once (so a client that got its whole answer is not left
    holding TIME_WAIT) and leaves uvloop's handle alone.
    """
    if transport.is_closing():
        return
    if transport.get_write_buffer_size() > 0:  # still flushing: look again shortly
        asyncio.get_running_loop().call_later(EOF_RETRY_DELAY, _forward_eof, transport)
        return
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError), socket.fromfd(
        sock.fileno(), socket.AF_INET, socket.SOCK_STREAM
    ) as dup:
        dup.shutdown(socket.SHUT_WR)


class PythonRelay:
    """Starts Python relays and remembers the live ones, so shutdown can close them."""

    def __init__(self) -> None:
        self._live: set[RelaySide] = set()

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
        loop = asyncio.get_running_loop()
        sides: list[RelaySide] = []
        done = False

        def closed() -> None:
            nonlocal done
            self._live.difference_update(sides)
            if not done:
                done = True
                on_closed()

        upstream_side = RelaySide(to_client, closed)
        client_side = RelaySide(to_upstream, closed, peer=upstream_side)
        sides += (upstream_side, client_side)
        self._live.update(sides)
        await loop.create_connection(lambda: upstream_side, sock=upstream)
        await loop.connect_accepted_socket(lambda: client_side, client)

    def close(self) -> None:
        """Close every live relay (a clean close: buffered bytes are flushed first)."""
        for side in list(self._live):
            if side.transport is not None:
                side.transport.close()
        self._live.clear()
