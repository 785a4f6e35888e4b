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
from _socket import socket as _raw_socket
from collections.abc import Callable

from consulate.proxy.deadlines import ConnectDeadlines

# Per-direction buffering the agent accepts before it stops reading the sender.
WRITE_HIGH_WATER = 256 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
EOF_RETRY_DELAY = 0.002  # seconds between checks that a buffered direction has drained
EARLY_LIMIT = 64 * 1024  # bytes a client side keeps before its upstream joins, then pauses


class RelaySide(asyncio.Protocol):
    """One end of a relay; ``peer`` is the other end once the pair is joined.

    ``on_made`` runs when the transport exists (the proxy routes an accepted
    client there); ``on_closed`` is shared by both ends of a pair (see
    ``ClientSide``), and ``on_bytes`` counts what this side reads.
    Every connection makes two of these: slots keep them small and quick.
    """

    __slots__ = ("_early", "_early_size", "_on_made", "closed", "on_bytes", "on_closed",
                 "peer", "read_eof", "transport")

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
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self.transport = transport  # type: ignore[assignment]  # a stream's: a Transport
        if self._on_made is not None:
            self._on_made(self)

    def join(self, client: RelaySide) -> None:
        """Pair this (upstream) side with ``client`` and pass on what it read meanwhile.

        Called by the connecting task once the connect has returned, not from
        ``connection_made``: the request then goes out next to the connects
        that the same loop turn starts (task steps run together), so the
        upstream's process is woken once for both rather than twice. Each
        wake of an idle CPU is an inter-processor interrupt, dear in a VM:
        joined in ``connection_made``, the relay sent 2.8 of them per
        connection instead of 1.0 (bench connection rate, perf stat
        ipi:ipi_send_cpu), 12 µs more kernel time per connection.
        """
        transport = self.transport
        assert transport is not None
        client.peer = self
        for chunk in client._early:
            client.on_bytes(len(chunk))
            transport.write(chunk)
        client._early.clear()
        if client.closed:  # it left while we connected: deliver what it sent, then go
            transport.close()
        elif client.read_eof:
            if self.read_eof:
                self._close_pair()
            else:
                _forward_eof(transport)
        elif client._early_size > EARLY_LIMIT:
            assert client.transport is not None
            client.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
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
        peer.transport.write(data)  # type: ignore[union-attr]  # a peer has its transport

    def eof_received(self) -> bool:
        self.read_eof = True
        peer = self.peer
        if peer is not None and not peer.closed:
            if peer.read_eof and peer.peer is self:  # both ways over: close() sends the FIN
                self._close_pair()
            else:  # (an upstream not joined yet leaves the closing to join)
                _forward_eof(peer.transport)  # type: ignore[arg-type]
        return True  # keep our writing side open: this is a half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and not peer.closed:
            if exc is not None:  # propagate the reset: abort() alone would send a FIN
                reset(peer.transport)  # type: ignore[arg-type]
            else:
                peer.transport.close()  # type: ignore[union-attr]  # flushes it first
        if peer is None or peer.closed:
            self.on_closed()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def drop(self) -> None:
        """Abort an upstream side that was never joined, leaving its client alone."""
        self.peer = None
        self.on_closed = _nothing
        if self.transport is not None:
            self.transport.abort()

    def _close_pair(self) -> None:
        for side in (self, self.peer):
            if side is not None and side.transport is not None:
                side.transport.close()


class ClientSide(RelaySide):
    """The side a pair starts from; it owns the pair's end of life (``pair_over``)."""

    __slots__ = ("_live", "done", "on_done")

    def __init__(self, live: set[RelaySide],
                 on_made: Callable[[RelaySide], None] | None = None) -> None:
        super().__init__(_ignore_bytes, self.pair_over, on_made=on_made)
        self.on_done: Callable[[], None] = _nothing
        self.done = False
        self._live = live

    def pair_over(self) -> None:
        """Both ends are closed (or the client's, before any upstream joined).

        Then the pair is unlinked: two protocols that point at each other
        (and the client at itself, through its ``pair_over`` callback) are a
        reference cycle that only the garbage collector frees. Every relayed
        connection left one behind, two dozen objects with its transports,
        task and route, which pushed the agent into collections of its whole
        heap. Unlinked, refcounting frees them as soon as uvloop lets go.
        """
        live = self._live
        live.discard(self)
        upstream = self.peer
        if upstream is not None:
            live.discard(upstream)
        if not self.done:
            self.done = True
            self.on_done()
        if self.closed and (upstream is None or upstream.closed):
            for side in (self, upstream):
                if side is not None:
                    side.peer = side.transport = None
                    side.on_closed = _nothing
            self.on_done = _nothing


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
    shutdown(), so a socket object borrows the descriptor for the call: the C
    type itself (``socket.socket`` adds a Python-level ``__init__``), built with
    its family and type given (no getsockopt to find them) and detached after,
    it neither duplicates nor closes it.
    """
    if transport.is_closing():
        return
    if transport.get_write_buffer_size() > 0:  # still flushing: look again shortly
        asyncio.get_running_loop().call_later(EOF_RETRY_DELAY, _forward_eof, transport)
        return
    stand_in = transport.get_extra_info("socket")
    if stand_in is None:
        return
    borrowed = _raw_socket(socket.AF_INET, socket.SOCK_STREAM, 0, stand_in.fileno())
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
        self.deadlines = ConnectDeadlines()  # for the connects of the joins

    def client(self, on_made: Callable[[RelaySide], None] | None = None) -> ClientSide:
        """A client side (a protocol for an accepted connection).

        Its ``on_bytes`` and ``on_done`` can be set once it is known where the
        connection goes: the pair calls ``on_done`` once, when it is over.
        """
        side = ClientSide(self._live, on_made=on_made)
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
            self._live.discard(side)
            if side.transport is not None:  # connected as the wait ran out: never joined
                side.drop()
            raise
        if side.closed:  # the upstream left before it could join: so did the client
            self._live.discard(side)
        else:
            side.join(client)

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
        self.deadlines.close()


def _ignore_bytes(_count: int) -> None:
    """Byte counter of a client side until the proxy knows its service."""


def _nothing() -> None:
    """End-of-life callback of a pair nobody accounts for (a refused client)."""
