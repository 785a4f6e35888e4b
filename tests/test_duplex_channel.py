"""The channel state machine and its Channel, driven without sockets (a fake link)."""

from __future__ import annotations

import pytest

from consulate.control.duplex.channel import TRANSITIONS, Channel, Event, State
from consulate.control.duplex.connection import RemotePeer
from consulate.control.duplex.errors import (
    ChannelClosedError,
    ChannelInterrupted,
    ConnectionLost,
    DuplexError,
    ProtocolError,
    RemoteError,
)
from consulate.control.duplex.frames import DATA, OPEN, Frame


class FakeLink:
    """Collects what a channel sends and how it drives flow control."""

    remote: RemotePeer | None = None

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.paused = 0
        self.released: list[Channel] = []

    def write_frame(self, frame: Frame) -> None:
        self.frames.append(frame)

    async def drain(self) -> None:
        return None

    def pause(self) -> None:
        self.paused += 1

    def resume(self) -> None:
        self.paused -= 1

    def release(self, channel: Channel) -> None:
        self.released.append(channel)


def _data(payload: bytes | None = None, *, last: bool = False, error: str | None = None,
          headers: dict[str, str] | None = None) -> Frame:
    return Frame(DATA, 1, "", headers or {}, error, last, payload)


def _linked(hwm: int = 8) -> tuple[Channel, FakeLink]:
    channel, link = Channel("m", hwm=hwm), FakeLink()
    channel._attach(link, 1)
    return channel, link


def test_the_table_ends_both_halves_in_either_order() -> None:
    for first, second in ((Event.SEND_LAST, Event.RECV_LAST), (Event.RECV_LAST, Event.SEND_LAST)):
        state = TRANSITIONS[(State.OPEN, first)]
        assert TRANSITIONS[(state, second)] is State.CLOSED
    assert all(TRANSITIONS[(s, Event.ABORT)] is State.ABORTED
               for s in (State.OPEN, State.LOCAL_DONE, State.REMOTE_DONE))
    assert not [key for key in TRANSITIONS if key[0] in (State.CLOSED, State.ABORTED)]


async def test_messages_then_none_at_the_end_with_headers_and_trailers() -> None:
    channel, _ = _linked()
    channel._on_frame(_data(b"a", headers={"content-type": "x"}))
    channel._on_frame(_data(b"b", last=True, headers={"status": "ok"}))
    assert [p async for p in channel] == [b"a", b"b"]
    assert await channel.receive() is None
    assert channel.remote_headers == {"content-type": "x"}
    assert channel.trailers == {"status": "ok"}
    assert channel.state is State.REMOTE_DONE


async def test_frames_wait_in_the_channel_until_a_link_takes_it() -> None:
    channel = Channel("echo", {"h": "1"})
    channel._start(b"first", False)
    channel.write(b"second", last=True)
    assert channel.peer is None and channel.state is State.LOCAL_DONE
    link = FakeLink()
    channel._attach(link, 7)
    assert link.frames == [Frame(OPEN, 7, "echo", {"h": "1"}, None, False, b"first"),
                           Frame(DATA, 7, "", {}, None, True, b"second")]


async def test_sending_after_last_is_this_sides_error() -> None:
    channel, link = _linked()
    channel.end({"t": "1"})
    assert link.frames == [_data(None, last=True, headers={"t": "1"})]
    with pytest.raises(ChannelClosedError, match="already sent its last frame"):
        channel.write(b"late")


async def test_a_frame_after_the_remote_last_is_the_remote_sides_error() -> None:
    channel, _ = _linked()
    channel._on_frame(_data(b"x", last=True))
    with pytest.raises(ProtocolError, match="after the remote side's last frame"):
        channel._on_frame(_data(b"y"))


async def test_a_final_error_comes_after_what_was_sent_before_it() -> None:
    channel, link = _linked()
    channel.end()
    channel._on_frame(_data(b"partial"))
    channel._on_frame(_data(None, last=True, error="disk full"))
    assert await channel.receive() == b"partial"
    with pytest.raises(RemoteError, match="disk full") as caught:
        await channel.receive()
    assert caught.value.method == "m"
    assert channel.state is State.CLOSED and link.released == [channel]


async def test_a_final_error_closes_both_halves_for_its_sender() -> None:
    channel, link = _linked()
    channel.fail("bad input")
    assert link.frames == [_data(None, last=True, error="bad input")]
    assert channel.state is State.CLOSED and link.released == [channel]


async def test_an_interrupt_from_the_remote_aborts_and_drops_what_was_buffered() -> None:
    channel, link = _linked()
    aborted: list[DuplexError] = []
    channel.on_abort = aborted.append
    channel._on_frame(_data(b"never read"))
    channel._on_frame(_data(None, error="cancelled by user"))
    with pytest.raises(ChannelInterrupted, match="by the remote side: cancelled by user"):
        await channel.receive()
    with pytest.raises(ChannelInterrupted):
        channel.write(b"x")
    assert channel.state is State.ABORTED and len(aborted) == 1 and link.released == [channel]


async def test_interrupt_sends_an_error_without_last_once() -> None:
    channel, link = _linked()
    channel.interrupt("stop")
    channel.interrupt("again")
    assert link.frames == [_data(None, error="stop")]
    with pytest.raises(ChannelInterrupted, match="by this side: stop"):
        await channel.receive()


async def test_a_lost_connection_still_delivers_what_arrived() -> None:
    channel, _ = _linked()
    channel._on_frame(_data(b"arrived"))
    channel._abort(ConnectionLost("connection to b lost"), discard=False)
    assert await channel.receive() == b"arrived"
    with pytest.raises(ConnectionLost, match="connection to b lost"):
        await channel.receive()


async def test_receive_nowait_answers_only_what_is_here() -> None:
    channel, _ = _linked()
    with pytest.raises(BlockingIOError, match="no message buffered"):
        channel.receive_nowait()
    channel._on_frame(_data(b"x", last=True))
    assert channel.remote_done and channel.buffered == 1
    assert channel.receive_nowait() == b"x"
    assert channel.receive_nowait() is None


async def test_a_full_inbox_pauses_the_connection_until_half_is_read() -> None:
    channel, link = _linked(hwm=4)
    for i in range(6):
        channel._on_frame(_data(bytes([i])))
    assert link.paused == 1  # once, at the fourth message
    assert [await channel.receive() for _ in range(3)] == [b"\x00", b"\x01", b"\x02"]
    assert link.paused == 1  # three left: above hwm/2
    await channel.receive()
    assert link.paused == 0


async def test_ending_a_paused_channel_resumes_the_connection() -> None:
    channel, link = _linked(hwm=2)
    channel._on_frame(_data(b"1"))
    channel._on_frame(_data(b"2"))
    assert link.paused == 1
    channel._on_frame(_data(None, error="gone"))
    assert link.paused == 0
