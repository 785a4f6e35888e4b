"""Duplex wire format without sockets: greetings, frames, and what is refused."""

from __future__ import annotations

import contextlib
import uuid

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consulate.control.duplex.errors import ProtocolError
from consulate.control.duplex.frames import DATA, OPEN, Decoder, Encoder, Frame, Greeting

PEER_ID = str(uuid.uuid4())


def _greeted(max_frame_size: int = 1024) -> Decoder:
    decoder = Decoder(max_frame_size)
    assert decoder.feed(Encoder().greeting(PEER_ID, "a")) == [Greeting(PEER_ID, "a")]
    return decoder


FRAMES = [
    Frame(OPEN, 1, "echo", {"trace": "abc"}, None, False, None),
    Frame(OPEN, 3, "add", {}, None, True, b"\x92\x01\x02"),
    Frame(DATA, 2, "", {}, None, False, b""),
    Frame(DATA, 2, "", {"grpc-status": "0"}, None, True, None),
    Frame(DATA, 5, "", {}, "boom", True, None),
    Frame(DATA, 7, "", {}, "stop", False, None),
]


def test_frames_round_trip_even_fed_one_byte_at_a_time() -> None:
    wire = Encoder().greeting(PEER_ID, "peer-a") + b"".join(map(Encoder().frame, FRAMES))
    decoder = Decoder()
    out: list[Greeting | Frame] = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i:i + 1])
    assert out == [Greeting(PEER_ID, "peer-a"), *FRAMES]


def test_a_frame_is_the_msgpack_array_of_its_seven_fields() -> None:
    frame = Frame(OPEN, 1, "m", {"k": "v"}, None, True, b"x")
    assert msgpack.unpackb(Encoder().frame(frame)) == [0, 1, "m", {"k": "v"}, None, True, b"x"]


def test_an_empty_error_string_means_no_error() -> None:
    wire = msgpack.packb([DATA, 2, "", {}, "", False, b"x"])
    assert _greeted().feed(wire) == [Frame(DATA, 2, "", {}, None, False, b"x")]


@pytest.mark.parametrize(("greeting", "reason"), [
    (["HTTP", 1, PEER_ID, "a"], "not a duplex greeting"),
    ([0, 1, 2], "not a duplex greeting"),
    (["DUPLEX", 2, PEER_ID, "a"], "unsupported duplex version 2"),
    (["DUPLEX", 1, "not-a-uuid", "a"], "not a UUID"),
    (["DUPLEX", 1, PEER_ID, 7], "greeting name"),
    (["DUPLEX", 1, PEER_ID, "x" * 300], "greeting name"),
])
def test_a_bad_greeting_is_refused_with_the_reason(greeting: object, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        Decoder().feed(msgpack.packb(greeting))


@pytest.mark.parametrize(("frame", "reason"), [
    ([DATA, 1, "", {}, None, False], "array of 7 items"),
    ({"type": 1}, "array of 7 items"),
    ([2, 1, "", {}, None, False, None], "frame type must be 0"),
    ([True, 1, "", {}, None, False, None], "frame type must be 0"),
    ([DATA, 0, "", {}, None, False, None], "channel must be a positive integer"),
    ([DATA, -3, "", {}, None, False, None], "channel must be a positive integer"),
    ([DATA, "1", "", {}, None, False, None], "channel must be a positive integer"),
    ([OPEN, 1, b"m", {}, None, False, None], "method must be a string"),
    ([OPEN, 1, "m", [], None, False, None], "headers must be a map"),
    ([OPEN, 1, "m", {"k": 1}, None, False, None], "map strings to strings"),
    ([DATA, 1, "", {}, 42, False, None], "error must be nil or a string"),
    ([DATA, 1, "", {}, None, 1, None], "last must be a boolean"),
    ([DATA, 1, "", {}, None, False, "text"], "payload must be nil or binary"),
])
def test_a_frame_of_the_wrong_shape_names_the_bad_field(frame: object, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        _greeted().feed(msgpack.packb(frame))


def test_malformed_msgpack_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="malformed msgpack"):
        _greeted().feed(b"\xc1")  # the one byte msgpack never uses


def test_an_oversized_frame_is_refused_before_it_is_buffered() -> None:
    big = Frame(DATA, 1, "", {}, None, False, b"x" * 2048)
    with pytest.raises(ProtocolError, match="malformed msgpack"):
        _greeted(max_frame_size=1024).feed(Encoder(max_frame_size=4096).frame(big))


def test_length_headers_cannot_make_the_decoder_allocate() -> None:
    """An array or map header claiming 2**32-1 items is refused on sight."""
    for header in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"):
        with pytest.raises(ProtocolError, match="malformed msgpack"):
            _greeted().feed(header)


def test_strings_are_capped_whatever_the_frame_size() -> None:
    """Names, header values and errors are small: a 20 KB header value is refused, so
    a frame still arriving can never hold more than its payload and small headers."""
    frame = [OPEN, 1, "m", {"k": "v" * 20_000}, None, False, None]
    with pytest.raises(ProtocolError, match="malformed msgpack"):
        _greeted(max_frame_size=1 << 20).feed(msgpack.packb(frame))


def test_the_encoder_refuses_frames_the_other_end_would_refuse() -> None:
    with pytest.raises(ValueError, match="larger than max_frame_size=1024"):
        Encoder(max_frame_size=1024).frame(Frame(DATA, 1, "", {}, None, False, b"x" * 2000))


def test_frames_larger_than_a_read_still_decode() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: several feed slices
    wire = Encoder().frame(Frame(DATA, 2, "", {}, None, True, payload))
    decoder = _greeted(max_frame_size=2 * len(payload))
    assert decoder.feed(wire[:10]) == []
    assert decoder.feed(wire[10:]) == [Frame(DATA, 2, "", {}, None, True, payload)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data: bytes) -> None:
    decoder = _greeted()
    with contextlib.suppress(ProtocolError):
        decoder.feed(data)
