"""The wire format, without I/O: a greeting, then frames, all msgpack.

A connection is a byte stream of msgpack objects, one after the other: msgpack
is self-delimiting, so it needs no length prefix of its own. Each side first sends
a *greeting* ``["DUPLEX", 1, peer_id, name]`` (``peer_id`` a UUID string), then
*frames*, each an array of seven items:

``[type, channel, method, headers, error, last, payload]``

=========  ================================================================
type       ``OPEN`` (0) starts a channel, ``DATA`` (1) continues it
channel    positive integer; the side that dialed numbers its channels
           odd, the side that accepted even, so both can open at once
method     what the channel is for (OPEN); ``""`` on DATA
headers    map of str to str: request headers on OPEN, response headers
           on DATA, trailers on the frame with ``last``
error      nil, or text: with ``last`` a final error, without it an
           interrupt that aborts the channel both ways (``""`` = nil)
last       true on the sender's final frame for the channel
payload    nil, or bytes (the application's message; an OPEN may carry
           the first one, so a unary call is a single frame each way)
=========  ================================================================

"Length-safe": :class:`Decoder` feeds a streaming ``msgpack.Unpacker`` whose
buffer and every string (16 KiB), binary (max_frame_size), array and map length
are capped, so a hostile
or broken peer cannot make this process allocate without bound; anything that
is not a well-formed greeting or frame raises :class:`~.errors.ProtocolError`.
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

import msgpack

from .errors import ProtocolError

OPEN = 0
DATA = 1

MAGIC = "DUPLEX"
VERSION = 1

DEFAULT_MAX_FRAME_SIZE = 8 * 1024 * 1024
# Incoming bytes are fed to the unpacker in slices of at most this size, so that
# its buffer (max_frame_size + _FEED_SLICE) always has room for one whole frame
# plus the next slice: a legal frame never trips BufferFull.
_FEED_SLICE = 256 * 1024
_MAX_NAME = 256
# Strings are names, header values and error texts: small. The cap bounds what a
# frame still being received can hold to about max_frame_size (its payload) plus
# _MAX_HEADERS * 2 * MAX_STRING (its headers), whatever the peer sends.
MAX_STRING = 16 * 1024
_MAX_HEADERS = 256


class Frame(NamedTuple):
    """One frame, in wire order (a NamedTuple: msgpack packs it as the array)."""

    type: int
    channel: int
    method: str
    headers: dict[str, str]
    error: str | None
    last: bool
    payload: bytes | None


class Greeting(NamedTuple):
    """Who is on the other end: its peer id (a UUID string) and name."""

    peer_id: str
    name: str


class Encoder:
    """Frames and greetings to bytes, with one reusable ``msgpack.Packer``.

    Refuses frames larger than ``max_frame_size``: the other end would close the
    connection on them, killing every channel it carries, not just this one.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def greeting(self, peer_id: str, name: str) -> bytes:
        return self._pack([MAGIC, VERSION, peer_id, name])  # type: ignore[no-any-return]

    def frame(self, frame: Frame) -> bytes:
        data: bytes = self._pack(frame)
        if len(data) > self.max_frame_size:
            raise ValueError(
                f"frame of {len(data)} bytes on channel {frame.channel} is larger than "
                f"max_frame_size={self.max_frame_size}: send smaller messages (stream them) "
                "or raise max_frame_size on both ends")
        return data


class Decoder:
    """Bytes in, a greeting then frames out; raises ProtocolError on anything else.

    After a ProtocolError the stream is out of sync: the caller must drop the
    connection, not feed more.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._greeted = False
        self._unpacker = msgpack.Unpacker(
            max_buffer_size=max_frame_size + _FEED_SLICE,
            max_str_len=MAX_STRING, max_bin_len=max_frame_size,
            max_array_len=16, max_map_len=_MAX_HEADERS, max_ext_len=0,
            raw=False, strict_map_key=True, use_list=True)

    def feed(self, data: bytes) -> list[Greeting | Frame]:
        """Take any amount of bytes; return the complete greeting/frames in them."""
        out: list[Greeting | Frame] = []
        if len(data) <= _FEED_SLICE:
            self._feed(data, out)
        else:
            for start in range(0, len(data), _FEED_SLICE):
                self._feed(data[start:start + _FEED_SLICE], out)
        return out

    def _feed(self, data: bytes, out: list[Greeting | Frame]) -> None:
        try:
            self._unpacker.feed(data)
            for obj in self._unpacker:
                out.append(self._item(obj))
        except msgpack.BufferFull:  # defensive: slices and caps keep it from happening
            raise ProtocolError(
                f"frame larger than max_frame_size={self.max_frame_size} bytes") from None
        except ProtocolError:
            raise
        except (ValueError, msgpack.UnpackException) as exc:
            # the unpacker's own checks: a length above a cap, bad bytes, bad UTF-8
            raise ProtocolError(f"malformed msgpack: {exc}") from None

    def _item(self, obj: Any) -> Greeting | Frame:
        if self._greeted:
            return parse_frame(obj)
        self._greeted = True
        return parse_greeting(obj)


def parse_greeting(obj: Any) -> Greeting:
    """Check the first object of a stream; ProtocolError says what is wrong."""
    if not (type(obj) is list and len(obj) == 4 and obj[0] == MAGIC):
        raise ProtocolError(f"not a duplex greeting: {_show(obj)}")
    _, version, peer_id, name = obj
    if version != VERSION:
        raise ProtocolError(f"unsupported duplex version {_show(version)} (this side: "
                            f"{VERSION})")
    if type(peer_id) is not str or not _is_uuid(peer_id):
        raise ProtocolError(f"greeting peer id is not a UUID: {_show(peer_id)}")
    if type(name) is not str or len(name) > _MAX_NAME:
        raise ProtocolError(f"greeting name is not a string of at most {_MAX_NAME} "
                            f"characters: {_show(name)}")
    return Greeting(peer_id, name)


def parse_frame(obj: Any) -> Frame:
    """Check the shape of one decoded frame; ProtocolError names the bad field."""
    if type(obj) is not list or len(obj) != 7:
        raise ProtocolError(f"a frame is an array of 7 items, got {_show(obj)}")
    ftype, channel, method, headers, error, last, payload = obj
    if type(ftype) is not int or (ftype != OPEN and ftype != DATA):
        raise ProtocolError(f"frame type must be 0 (OPEN) or 1 (DATA), got {_show(ftype)}")
    if type(channel) is not int or channel < 1 or channel >= 1 << 63:
        raise ProtocolError(f"frame channel must be a positive integer, got {_show(channel)}")
    if type(method) is not str:
        raise ProtocolError(f"frame method must be a string, got {_show(method)}")
    if type(headers) is not dict:
        raise ProtocolError(f"frame headers must be a map, got {_show(headers)}")
    if headers and not all(type(k) is str and type(v) is str for k, v in headers.items()):
        raise ProtocolError(f"frame headers must map strings to strings, got {_show(headers)}")
    if error is not None and type(error) is not str:
        raise ProtocolError(f"frame error must be nil or a string, got {_show(error)}")
    if type(last) is not bool:
        raise ProtocolError(f"frame last must be a boolean, got {_show(last)}")
    if payload is not None and type(payload) is not bytes:
        raise ProtocolError(f"frame payload must be nil or binary, got {_show(payload)}")
    return Frame(ftype, channel, method, headers, error or None, last, payload)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _show(value: object, limit: int = 80) -> str:
    """A value for an error message: its repr, cut short (it came from the wire)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
