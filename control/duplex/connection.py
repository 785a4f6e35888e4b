"""One connection to another peer: the asyncio protocol around the frame codec.

It greets, decodes frames and hands each to its channel, numbers the channels it
carries, coalesces outgoing frames into one write per event-loop turn, and turns
flow control into ``pause_reading``/``resume_reading`` of the socket. Anything
that is not Duplex closes this connection, with the reason logged; the peer that
owns it goes on serving its other connections.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol, cast

from .channel import Channel
from .errors import ConnectionLost, ProtocolError
from .frames import OPEN, Decoder, Encoder, Frame, Greeting

log = logging.getLogger(__name__)

# Bytes queued at which drain() writes them at once instead of at the end of the
# loop turn, so that the transport sees them and can push back (pause_writing).
_FLUSH_NOW = 64 * 1024


@dataclass(frozen=True)
class RemotePeer:
    """Who is on the other end of one connection, as its greeting said.

    ``endpoint`` is the URI this side dialed (``outgoing``) or the one it accepted
    the connection on. A peer reachable over two connections appears twice, with
    the same ``id``.
    """

    id: str
    name: str
    endpoint: str
    outgoing: bool


class Owner(Protocol):
    """The peer a connection reports to (``peer.Peer``)."""

    id: str
    name: str

    def _connection_made(self, conn: Connection) -> None: ...

    def _connection_ready(self, conn: Connection) -> None: ...

    def _channel_opened(self, conn: Connection, channel: Channel) -> None: ...

    def _channel_ended(self) -> None: ...

    def _connection_lost(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """A transport carrying channels, between this peer (the owner) and one remote."""

    def __init__(self, owner: Owner, endpoint: str, *, outgoing: bool, hwm: int,
                 max_frame_size: int, greeting_timeout: float) -> None:
        self.owner = owner
        self.endpoint = endpoint
        self.outgoing = outgoing
        self.remote: RemotePeer | None = None  # set by the greeting
        self.channels: dict[int, Channel] = {}
        self._hwm = hwm
        self._greeting_timeout = greeting_timeout
        self._decoder = Decoder(max_frame_size)
        self._encoder = Encoder(max_frame_size)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._parity = 1 if outgoing else 0  # of the ids this side gives its channels
        self._next_id = 1 if outgoing else 2
        self._incoming = 0  # channels the remote opened that are still live
        self._pauses = 0  # reasons to stop reading: full inboxes, too many incoming
        self._too_many = False
        self._write_paused = False
        self._drainers: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._close_reason = ""
        self.lost = self._loop.create_future()  # done when the connection is gone

    def __repr__(self) -> str:
        who = f"{self.remote.name}/{self.remote.id[:8]}" if self.remote else "?"
        return f"<Connection {'to' if self.outgoing else 'from'} {who} via {self.endpoint}>"

    # -- asyncio callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one
        self._transport = transport = cast(asyncio.Transport, transport)
        transport.write(self._encoder.greeting(self.owner.id, self.owner.name))
        self._timer = self._loop.call_later(self._greeting_timeout, self._no_greeting)
        self.owner._connection_made(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            for item in self._decoder.feed(data):
                if self.remote is None:
                    assert isinstance(item, Greeting)  # the decoder returns it first
                    self._greeted(item)
                else:
                    assert isinstance(item, Frame)
                    self._on_frame(item)
                if self._closing:
                    return
        except ProtocolError as exc:
            self.close(f"bad input: {exc}", error=True)

    def eof_received(self) -> bool:
        return False  # half-open is not part of the protocol: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        reason = (f"connection to {self._who()} lost: "
                  f"{self._close_reason or exc or 'closed by the remote side'}")
        for channel in list(self.channels.values()):
            channel._abort(ConnectionLost(reason), discard=False)
        self.channels.clear()
        for waiter in self._drainers:
            if not waiter.done():
                waiter.set_exception(ConnectionLost(reason))
        self._drainers.clear()
        if not self.lost.done():
            self.lost.set_result(None)
        if self.remote is not None:
            self.owner._connection_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drainers:
            if not waiter.done():
                waiter.set_result(None)
        self._drainers.clear()

    # -- incoming -----------------------------------------------------------------

    def _greeted(self, greeting: Greeting) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if greeting.peer_id == self.owner.id:
            self.close("connected to itself (same peer id)", error=True)
            return
        self.remote = RemotePeer(greeting.peer_id, greeting.name, self.endpoint, self.outgoing)
        log.info("duplex connected peer=%s id=%s endpoint=%s direction=%s", greeting.name,
                 greeting.peer_id, self.endpoint, "out" if self.outgoing else "in")
        self.owner._connection_ready(self)

    def _on_frame(self, frame: Frame) -> None:
        if frame.type == OPEN:
            if (frame.channel & 1) == self._parity or frame.channel in self.channels:
                raise ProtocolError(f"OPEN for channel {frame.channel}, which the remote "
                                    "side may not open (taken, or of this side's parity)")
            channel = Channel(frame.method, frame.headers, hwm=self._hwm)
            channel._attach(self, frame.channel)
            self.channels[frame.channel] = channel
            self._incoming += 1
            if self._incoming >= self._hwm and not self._too_many:
                self._too_many = True
                self.pause()
            channel._on_frame(frame)
            self.owner._channel_opened(self, channel)
            return
        known = self.channels.get(frame.channel)
        if known is not None:
            known._on_frame(frame)
        # else: a frame for a channel this side already ended (an interrupt crossing
        # the remote's frames): nothing is waiting for it.

    def _no_greeting(self) -> None:
        self.close(f"no greeting within {self._greeting_timeout:g} s", error=True)

    # -- outgoing (the Link protocol of channel.py) -------------------------------

    def attach(self, channel: Channel) -> None:
        """Carry a channel this side opened: give it the next id of this side's parity."""
        if self._closing:
            raise ConnectionLost(f"connection to {self._who()} is closing")
        channel_id, self._next_id = self._next_id, self._next_id + 2
        self.channels[channel_id] = channel
        channel._attach(self, channel_id)

    def write_frame(self, frame: Frame) -> None:
        if self._closing:
            raise ConnectionLost(f"connection to {self._who()} is closed")
        data = self._encoder.frame(frame)
        self._out.append(data)
        self._out_size += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """One write per loop turn for every frame queued in it (replies to a batch
        of calls read in one ``data_received`` leave in one syscall)."""
        self._flush_scheduled = False
        out, self._out, self._out_size = self._out, [], 0
        if not out:
            return
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def drain(self) -> None:
        if self._out_size >= _FLUSH_NOW:  # a sender that never yields still gets flushed
            self._flush()
        if self._write_paused and not self._closing:
            waiter = self._loop.create_future()
            self._drainers.append(waiter)
            await waiter

    def pause(self) -> None:
        self._pauses += 1
        if self._pauses == 1 and self._transport is not None and not self._closing:
            self._transport.pause_reading()

    def resume(self) -> None:
        self._pauses -= 1
        if self._pauses == 0 and self._transport is not None and not self._closing:
            self._transport.resume_reading()

    def release(self, channel: Channel) -> None:
        if self.channels.pop(channel.id, None) is None:
            return
        if (channel.id & 1) != self._parity:
            self._incoming -= 1
            if self._too_many and self._incoming < self._hwm // 2:
                self._too_many = False
                self.resume()
        self.owner._channel_ended()

    # -- closing ------------------------------------------------------------------

    def close(self, reason: str, *, error: bool = False) -> None:
        """Close after sending what is queued; channels still open fail with
        ConnectionLost carrying ``reason``. ``error``: the remote side's fault
        (logged as a warning)."""
        if self._closing:
            return
        log.log(logging.WARNING if error else logging.INFO,
                "duplex closing connection peer=%s endpoint=%s reason=%s", self._who(),
                self.endpoint, reason)
        if self._out:
            self._flush()
        self._closing = True
        self._close_reason = reason
        if self._transport is not None:
            self._transport.close()

    def _who(self) -> str:
        return f"{self.remote.name} ({self.remote.id})" if self.remote else "(not greeted)"
