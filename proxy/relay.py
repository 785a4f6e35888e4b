"""The pure-Python relay: two asyncio protocols joined back to back.

Each side writes what it reads into the other side's transport. Flow control is
the transports' own: when one side's write buffer passes its high-water mark,
asyncio calls ``pause_writing`` on that side, which pauses reading on the other,
so a slow reader never makes the agent buffer without bound. EOF is forwarded as
a half-close (``write_eof``), and the pair closes only when both directions have
ended, so a client that shuts down its writing side still gets the whole answer.

The client side holds the first bytes it reads before an upstream exists and stops
reading (uvloop starts reading after ``connection_made`` whatever the protocol
asked there); the upstream side is created knowing its client, and joins the pair
the moment it connects, forwarding those bytes first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

# Per-direction buffering the agent accepts before it stops reading the sender.
WRITE_HIGH_WATER = 256 * 1024


class RelaySide(asyncio.Protocol):
    """One end of a relay; ``peer`` is the other end, set once both are connected."""

    def __init__(self, on_bytes: Callable[[int], None], peer: RelaySide | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.read_eof = False
        self.closed = False
        self._on_bytes = on_bytes
        self._early: list[bytes] = []

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            # The upstream side connected: join the pair and let the client speak.
            peer.peer = self
            for chunk in peer._early:
                peer._on_bytes(len(chunk))
                self.transport.write(chunk)
            peer._early.clear()
            if peer.read_eof:
                self.transport.write_eof()
            else:
                peer.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            # Not joined yet: keep these first bytes and stop reading until we are.
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
            peer.transport.write_eof()
            if peer.read_eof:
                self._close_pair()
        return True  # keep our writing side open: this is a half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            # close() flushes what is buffered for the peer before closing.
            peer.transport.close()

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
