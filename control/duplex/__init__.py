"""Duplex: brokerless RPC and streaming channels between peers, over msgpack frames.

In the spirit of ZeroMQ, and of progrium/duplex (2014) which it re-creates: every
peer can bind and connect to many endpoints (``tcp://host:port``,
``unix:///path``), redials lost connections, and once connected either side can
open channels to the other, round robin or to one chosen peer. A channel carries
messages both ways until each side sends ``last``; RPC (unary, server-, client-
and bidirectional streaming) is built on channels.

    from consulate.control import duplex

    server = duplex.RPCPeer("agent")
    server.register_function("add", lambda a, b: a + b)
    await server.bind("unix:///run/agent.sock")

    client = duplex.RPCPeer("scheduler")
    await client.connect("unix:///run/agent.sock")
    assert await client.call("add", 1, 2) == 3

The pieces, one concept per module: ``frames`` (wire format, sans-IO),
``channel`` (a channel's state machine), ``connection`` (asyncio protocol),
``endpoints`` (URIs and sockets), ``backoff`` (redial delays), ``peer`` (bind,
connect, open, accept), ``codec`` and ``rpc``. This package imports nothing else
of consulate.
"""

from .backoff import Backoff
from .channel import Channel, State
from .codec import Codec, JsonCodec, MsgpackCodec
from .connection import RemotePeer
from .endpoints import Endpoint, parse
from .errors import (
    ChannelClosedError,
    ChannelError,
    ChannelInterrupted,
    ConnectionLost,
    DuplexError,
    NoPeerError,
    PeerClosedError,
    ProtocolError,
    RemoteError,
)
from .frames import DATA, OPEN, Frame
from .peer import Peer
from .rpc import RPCPeer, Stream, current_channel, stream_input

__all__ = [
    "DATA",
    "OPEN",
    "Backoff",
    "Channel",
    "ChannelClosedError",
    "ChannelError",
    "ChannelInterrupted",
    "Codec",
    "ConnectionLost",
    "DuplexError",
    "Endpoint",
    "Frame",
    "JsonCodec",
    "MsgpackCodec",
    "NoPeerError",
    "Peer",
    "PeerClosedError",
    "ProtocolError",
    "RPCPeer",
    "RemoteError",
    "RemotePeer",
    "State",
    "Stream",
    "current_channel",
    "parse",
    "stream_input",
]
