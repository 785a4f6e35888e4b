"""How RPC arguments and results become payload bytes, and back.

The channel layer moves opaque bytes; the RPC layer (``rpc.py``) turns Python
values into them with a :class:`Codec`. msgpack is the default (compact, fast,
binary-safe); JSON is there for peers written in anything that speaks JSON. Any
object with the same three members can be passed instead. Both ends of a call
must use the same codec: nothing on the wire says which one a payload is in.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import msgpack


class Codec(Protocol):
    """``encode`` a value to bytes, ``decode`` bytes to a value; errors raise
    (TypeError/ValueError); ``name`` appears in error messages."""

    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


class MsgpackCodec:
    """msgpack with bin/str kept apart, through one reused Packer: an instance
    belongs to one event loop (one thread), like the peer that uses it."""

    name = "msgpack"

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def encode(self, value: Any) -> bytes:
        return self._pack(value)  # type: ignore[no-any-return]

    def decode(self, data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False)


class JsonCodec:
    """Compact UTF-8 JSON (no bytes values: JSON has none)."""

    name = "json"

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def decode(self, data: bytes) -> Any:
        return json.loads(data)

