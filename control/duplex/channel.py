"""A channel: one conversation on a connection, with its state machine.

A channel has two halves. Each side sends messages until it sends ``last``; the
channel is over when both have (CLOSED). It is over at once when either side
ends with an error (a final error: the other side gets what was sent before it,
then RemoteError; CLOSED), interrupts it (ABORTED: ChannelInterrupted, what was
buffered is dropped), or when the connection goes away (ABORTED). :data:`TRANSITIONS` is the whole
state machine; an event it does not list is illegal, and who caused it decides
the error: this side sending past its end raises ChannelClosedError, the remote
side doing so is a ProtocolError (the connection is closed).

The :class:`Channel` holds no socket: it talks to a :class:`Link` (the
connection, or a fake in tests). Until a connection takes it (an ``open`` that
waits for a peer), its frames wait in the channel itself.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .errors import (
    ChannelClosedError,
    ChannelInterrupted,
    DuplexError,
    ProtocolError,
    RemoteError,
)
from .frames import DATA, OPEN, Frame

if TYPE_CHECKING:
    from .connection import RemotePeer

DEFAULT_HWM = 1024


# StrEnum: hashed in C, which the transition lookup on every frame notices.
class State(enum.StrEnum):
    OPEN = "open"
    LOCAL_DONE = "local done"  # this side sent last; the remote may still send
    REMOTE_DONE = "remote done"  # the remote sent last; this side may still send
    CLOSED = "closed"
    ABORTED = "aborted"


class Event(enum.StrEnum):
    SEND = "send"
    SEND_LAST = "send last"
    RECV = "receive"
    RECV_LAST = "receive last"
    SEND_ERROR = "send error"  # last, with an error: ends both halves
    RECV_ERROR = "receive error"
    ABORT = "abort"


_S, _E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (_S.OPEN, _E.SEND): _S.OPEN,
    (_S.OPEN, _E.SEND_LAST): _S.LOCAL_DONE,
    (_S.OPEN, _E.RECV): _S.OPEN,
    (_S.OPEN, _E.RECV_LAST): _S.REMOTE_DONE,
    (_S.OPEN, _E.SEND_ERROR): _S.CLOSED,
    (_S.OPEN, _E.RECV_ERROR): _S.CLOSED,
    (_S.OPEN, _E.ABORT): _S.ABORTED,
    (_S.LOCAL_DONE, _E.RECV): _S.LOCAL_DONE,
    (_S.LOCAL_DONE, _E.RECV_LAST): _S.CLOSED,
    (_S.LOCAL_DONE, _E.RECV_ERROR): _S.CLOSED,
    (_S.LOCAL_DONE, _E.ABORT): _S.ABORTED,
    (_S.REMOTE_DONE, _E.SEND): _S.REMOTE_DONE,
    (_S.REMOTE_DONE, _E.SEND_LAST): _S.CLOSED,
    (_S.REMOTE_DONE, _E.SEND_ERROR): _S.CLOSED,
    (_S.REMOTE_DONE, _E.ABORT): _S.ABORTED,
}
_ENDED = (State.CLOSED, State.ABORTED)


class Link(Protocol):
    """What a channel needs from the connection that carries it."""

    remote: RemotePeer | None

    def write_frame(self, frame: Frame) -> None:
        """Queue a frame for sending (encoding errors raise here, to the caller)."""

    async def drain(self) -> None:
        """Return when the outgoing buffer is below its high-water mark."""

    def pause(self) -> None:
        """A channel's inbox reached its high-water mark: stop reading."""

    def resume(self) -> None:
        """That inbox went down to half: reading may go on (when no other is full)."""

    def release(self, channel: Channel) -> None:
        """The channel has ended: forget it."""


class Channel:
    """One side of a channel. Opened with ``Peer.open``/``open_with`` or received
    from ``Peer.accept``; the RPC layer is built on it.

    Receiving: :meth:`receive` (or ``async for payload in channel``) returns each
    message, then ``None`` once the other side has sent ``last``; it raises
    :class:`RemoteError` if that side ended with an error, and the abort reason
    (:class:`ChannelInterrupted`, :class:`ConnectionLost`, ...) if the channel was
    aborted. Sending: :meth:`send` (waits while the connection is backed up) or
    :meth:`write` (never waits), :meth:`end`, :meth:`fail`, :meth:`interrupt`.

    ``headers`` are the opener's headers (sent with OPEN), ``remote_headers``
    the headers the other side sent before its last frame (merged), ``trailers``
    those on its last frame.
    """

    __slots__ = ("_failure", "_hwm", "_inbox", "_link", "_paused", "_pending", "_remote_done",
                 "_remote_error", "_state", "_waiter", "headers", "id", "method", "on_abort",
                 "remote_headers", "trailers")

    def __init__(self, method: str, headers: dict[str, str] | None = None, *,
                 hwm: int = DEFAULT_HWM) -> None:
        self.method = method
        self.headers: dict[str, str] = headers or {}
        self.remote_headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.id = 0  # set by the connection that carries it
        # Called once if the channel is aborted (interrupt, connection lost), e.g.
        # to cancel the task serving it.
        self.on_abort: Callable[[DuplexError], None] | None = None
        self._state = State.OPEN
        self._hwm = hwm
        self._link: Link | None = None
        self._pending: list[Frame] | None = []  # frames waiting for a link; None once linked
        self._inbox: deque[bytes] = deque()
        self._paused = False
        self._remote_done = False
        self._remote_error: RemoteError | None = None
        self._failure: DuplexError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<Channel {self.id} {self.method!r} {self._state.value}>"

    @property
    def state(self) -> State:
        return self._state

    @property
    def peer(self) -> RemotePeer | None:
        """The remote peer carrying this channel (None while an open waits for one)."""
        return self._link.remote if self._link is not None else None

    @property
    def remote_done(self) -> bool:
        """True once the other side has sent ``last``: what is buffered is all there is."""
        return self._remote_done

    @property
    def buffered(self) -> int:
        """Messages received and not yet taken by :meth:`receive`."""
        return len(self._inbox)

    # -- sending ------------------------------------------------------------------

    def write(self, payload: bytes | None = None, *, last: bool = False,
              headers: dict[str, str] | None = None) -> None:
        """Queue a message (and/or headers, and/or ``last``) without waiting."""
        self._send(DATA, payload, last, headers, None)

    async def send(self, payload: bytes | None = None, *, last: bool = False,
                   headers: dict[str, str] | None = None) -> None:
        """:meth:`write`, then wait while the connection's outgoing buffer is full."""
        self._send(DATA, payload, last, headers, None)
        if self._link is not None:
            await self._link.drain()

    def end(self, trailers: dict[str, str] | None = None) -> None:
        """End this side of the channel (``last``), with optional trailers."""
        self._send(DATA, None, True, trailers, None)

    def fail(self, message: str, trailers: dict[str, str] | None = None) -> None:
        """End the channel with an error (a final error): the other side receives
        what was sent before, then RemoteError; it is expected to send nothing more."""
        self._send(DATA, None, True, trailers, message or "error")

    def interrupt(self, reason: str = "interrupted") -> None:
        """Abort the channel both ways: the other side's receive and send raise
        ChannelInterrupted. Does nothing if the channel has already ended."""
        if self._state in _ENDED:
            return
        frame = Frame(DATA, self.id, "", {}, reason or "interrupted", False, None)
        if self._link is not None:
            self._link.write_frame(frame)
        self._abort(ChannelInterrupted(reason, by_remote=False), discard=True)

    def _start(self, payload: bytes | None, last: bool) -> None:
        """Queue the OPEN frame (``Peer.open``), with the first message if any."""
        self._send(OPEN, payload, last, self.headers, None)

    def _send(self, ftype: int, payload: bytes | None, last: bool,
              headers: dict[str, str] | None, error: str | None) -> None:
        event = (Event.SEND if not last else
                 Event.SEND_LAST if error is None else Event.SEND_ERROR)
        state = TRANSITIONS.get((self._state, event))
        if state is None:
            if self._failure is not None:
                raise self._failure
            raise ChannelClosedError(f"channel {self.id} ({self.method!r}) already sent its "
                                     "last frame: nothing more can be sent on it")
        frame = Frame(ftype, self.id, self.method if ftype == OPEN else "", headers or {},
                      error, last, payload)
        if self._link is not None:
            self._link.write_frame(frame)  # may raise (frame too large): state unchanged
        else:
            assert self._pending is not None
            self._pending.append(frame)
        self._state = state
        if state is State.CLOSED:
            self._release()

    # -- receiving ----------------------------------------------------------------

    async def receive(self) -> bytes | None:
        """The next message; ``None`` at the clean end of the other side."""
        while not (self._inbox or self._remote_done or self._failure is not None):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.receive_nowait()

    def receive_nowait(self) -> bytes | None:
        """:meth:`receive` when its answer is already here; BlockingIOError if not."""
        if self._inbox:
            return self._take()
        if self._remote_done:
            if self._remote_error is not None:
                raise self._remote_error
            return None
        if self._failure is not None:
            raise self._failure
        raise BlockingIOError(f"channel {self.id} ({self.method!r}) has no message buffered")

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> bytes:
        payload = await self.receive()
        if payload is None:
            raise StopAsyncIteration
        return payload

    def _take(self) -> bytes:
        payload = self._inbox.popleft()
        if self._paused and len(self._inbox) <= self._hwm // 2:
            self._paused = False
            if self._link is not None:
                self._link.resume()
        return payload

    # -- driven by the connection -------------------------------------------------

    def _attach(self, link: Link, channel_id: int) -> None:
        """A connection takes the channel: number it and send what was waiting."""
        self._link, self.id = link, channel_id
        pending, self._pending = self._pending or [], None
        for frame in pending:
            link.write_frame(frame._replace(channel=channel_id))

    def _on_frame(self, frame: Frame) -> None:
        """A frame from the other side (the OPEN of an accepted channel included)."""
        if frame.error is not None and not frame.last:
            self._abort(ChannelInterrupted(frame.error, by_remote=True), discard=True)
            return
        event = (Event.RECV if not frame.last else
                 Event.RECV_LAST if frame.error is None else Event.RECV_ERROR)
        state = TRANSITIONS.get((self._state, event))
        if state is None:
            raise ProtocolError(f"frame on channel {self.id} ({self.method!r}) after the "
                                f"remote side's last frame")
        self._state = state
        if frame.headers and frame.type == DATA:
            (self.trailers if frame.last else self.remote_headers).update(frame.headers)
        if frame.payload is not None:
            self._inbox.append(frame.payload)
            if not self._paused and len(self._inbox) >= self._hwm:
                self._paused = True
                if self._link is not None:
                    self._link.pause()
        if frame.last:
            self._remote_done = True
            if frame.error is not None:  # sending after this raises it too
                self._remote_error = self._failure = RemoteError(self.method, frame.error)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if state is State.CLOSED:
            self._release()

    def _abort(self, failure: DuplexError, *, discard: bool) -> None:
        """End the channel now. ``discard``: drop what was received but not taken
        (an interrupt); otherwise it can still be read (a lost connection)."""
        if self._state in _ENDED:
            return
        self._state = State.ABORTED
        self._failure = failure
        if discard:
            self._inbox.clear()
            self._remote_done = False
            self._remote_error = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._release()
        if self.on_abort is not None:
            callback, self.on_abort = self.on_abort, None
            callback(failure)

    def _release(self) -> None:
        if self._paused and self._link is not None:
            self._paused = False
            self._link.resume()
        if self._link is not None:
            self._link.release(self)

