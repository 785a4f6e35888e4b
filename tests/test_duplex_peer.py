"""Duplex peers over real sockets (127.0.0.1 and unix sockets in a temp dir), each test
over tcp and unix: greeting, open/accept, round robin, targeted opens, drop, bad input,
unbind, reconnect, backpressure, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import pytest
from duplexfix import Endpoints

from consulate.control.duplex import (
    ChannelInterrupted,
    ConnectionLost,
    NoPeerError,
    Peer,
    PeerClosedError,
    State,
)
from consulate.control.duplex.endpoints import parse
from consulate.control.duplex.frames import DATA, OPEN, Decoder, Encoder, Frame, Greeting

MakePeer = Callable[..., Peer]




@pytest.fixture
async def make_peer() -> AsyncIterator[MakePeer]:
    made: list[Peer] = []

    def make(name: str, **options: object) -> Peer:
        options.setdefault("open_timeout", 3.0)
        made.append(Peer(name, **options))  # type: ignore[arg-type]
        return made[-1]

    yield make
    await asyncio.gather(*(peer.shutdown(timeout=0.2) for peer in made))


async def _pair(make_peer: MakePeer, endpoints: Endpoints) -> tuple[Peer, Peer, str]:
    server, client = make_peer("server"), make_peer("client")
    uri = await server.bind(endpoints())
    await client.connect(uri)
    await client.wait_for_peers(timeout=3)
    await server.wait_for_peers(timeout=3)
    return server, client, uri


async def test_the_greeting_tells_each_side_who_the_other_is(make_peer: MakePeer,
                                                             endpoints: Endpoints) -> None:
    server, client, uri = await _pair(make_peer, endpoints)
    [seen_by_client] = client.peers()
    [seen_by_server] = server.peers()
    assert (seen_by_client.id, seen_by_client.name) == (server.id, "server")
    assert (seen_by_server.id, seen_by_server.name) == (client.id, "client")
    assert seen_by_client.endpoint == seen_by_server.endpoint == uri
    assert seen_by_client.outgoing and not seen_by_server.outgoing
    uuid.UUID(server.id)


async def test_open_and_accept_carry_headers_both_ways_and_trailers(
        make_peer: MakePeer, endpoints: Endpoints) -> None:
    server, client, _ = await _pair(make_peer, endpoints)
    channel = client.open("upload", b"part 1", headers={"auth": "token"})
    method, accepted = await server.accept()
    assert (method, accepted.headers) == ("upload", {"auth": "token"})
    assert accepted.peer is not None and accepted.peer.id == client.id
    await channel.send(b"part 2", last=True)
    assert [p async for p in accepted] == [b"part 1", b"part 2"]
    await accepted.send(b"", headers={"content-type": "none"})
    accepted.end(trailers={"status": "stored"})
    assert await channel.receive() == b""
    assert await channel.receive() is None
    assert channel.remote_headers == {"content-type": "none"}
    assert channel.trailers == {"status": "stored"}
    assert channel.state is accepted.state is State.CLOSED


async def test_either_side_can_open_channels_at_the_same_time(make_peer: MakePeer,
                                                              endpoints: Endpoints) -> None:
    server, client, _ = await _pair(make_peer, endpoints)
    from_client = client.open("a", b"1", last=True)
    from_server = server.open("b", b"2", last=True)
    (_, at_server), (_, at_client) = await server.accept(), await client.accept()
    assert (from_client.id % 2, from_server.id % 2) == (1, 0)  # dialer odd, acceptor even
    assert (await at_server.receive(), await at_client.receive()) == (b"1", b"2")


async def test_opens_wait_for_a_connection_then_go_round_robin(make_peer: MakePeer,
                                                               endpoints: Endpoints) -> None:
    servers = [make_peer(f"s{i}") for i in range(3)]
    uris = [await s.bind(endpoints()) for s in servers]
    client = make_peer("client")
    early = client.open("early", b"x", last=True)  # nobody connected yet: it waits
    assert early.peer is None
    for uri in uris:
        await client.connect(uri)
    await client.wait_for_peers(3, timeout=3)
    assert early.peer is not None
    for _ in range(6):
        client.open("rr", b"x", last=True)
    got: dict[str, list[str]] = {}
    for server in servers:
        for _ in range(3 if server.id == early.peer.id else 2):
            method, _channel = await asyncio.wait_for(server.accept(), 3)
            got.setdefault(server.name, []).append(method)
    assert sorted(len(methods) for methods in got.values()) == [2, 2, 3]
    assert sum(methods.count("early") for methods in got.values()) == 1


async def test_open_with_reaches_the_one_peer_asked_for(make_peer: MakePeer,
                                                        endpoints: Endpoints) -> None:
    first, second, client = make_peer("first"), make_peer("second"), make_peer("client")
    for server in (first, second):
        await client.connect(await server.bind(endpoints()))
    await client.wait_for_peers(2, timeout=3)
    target = next(p for p in client.peers() if p.name == "second")
    for ref in (target, target.id, "second"):
        client.open_with(ref, "only-second", b"x", last=True)
    for _ in range(3):
        method, _channel = await asyncio.wait_for(second.accept(), 3)
        assert method == "only-second"
    with pytest.raises(NoPeerError, match=r"no connected peer 'third' \(connected: "):
        client.open_with("third", "m")


async def test_dropping_a_peer_fails_its_channels_on_both_sides(make_peer: MakePeer,
                                                                endpoints: Endpoints) -> None:
    server, client, _ = await _pair(make_peer, endpoints)
    channel = client.open("long")
    _, accepted = await server.accept()
    assert server.drop(client.id) == 1
    with pytest.raises(ConnectionLost, match="dropped by server"):
        await accepted.receive()
    with pytest.raises(ConnectionLost, match="lost"):
        await channel.receive()
    with pytest.raises(ConnectionLost):
        await channel.send(b"x")
    with pytest.raises(NoPeerError):
        server.drop(client.id)
    await client.wait_for_peers(timeout=3)  # the connector redials


async def test_an_open_with_no_peer_fails_after_its_timeout(make_peer: MakePeer,
                                                            endpoints: Endpoints) -> None:
    lonely = make_peer("lonely")
    with pytest.raises(NoPeerError, match=r"within 0\.1 s to open 'm' on peer 'lonely': it "
                                          r"neither binds nor connects"):
        await lonely.open("m", timeout=0.1).receive()
    unreachable = endpoints().replace(":0", ":1")
    await lonely.connect(unreachable)
    with pytest.raises(NoPeerError, match=r"connecting to .*\(last error: "):
        await lonely.open("m", timeout=0.3).receive()


async def test_a_peer_that_was_never_connected_accepts_interrupts(
        make_peer: MakePeer, endpoints: Endpoints) -> None:
    server, client = make_peer("server"), make_peer("client")
    waiting = client.open("m")
    waiting.interrupt("changed my mind")
    await client.connect(await server.bind(endpoints()))
    await client.wait_for_peers(timeout=3)
    sent = client.open("n", b"x", last=True)
    method, _ = await asyncio.wait_for(server.accept(), 3)
    assert method == "n" and sent.peer is not None
    with pytest.raises(ChannelInterrupted, match="changed my mind"):
        await waiting.receive()


async def _raw(uri: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    endpoint = parse(uri)
    if endpoint.scheme == "unix":
        return await asyncio.open_unix_connection(endpoint.path)
    return await asyncio.open_connection(endpoint.host, endpoint.port)


GREETING = Encoder().greeting(str(uuid.uuid4()), "raw")
BAD_INPUTS = {
    "malformed": (GREETING + b"\xc1", "malformed msgpack"),
    "oversized": (GREETING + Encoder(1 << 20).frame(Frame(DATA, 1, "", {}, None, False,
                                                         b"x" * 5000)), "malformed msgpack"),
    "wrong shape": (GREETING + msgpack.packb([OPEN, 1, "m"]), "array of 7 items"),
    "bad greeting": (b"GET / HTTP/1.1\r\n\r\n", "bad input"),
    "wrong parity": (GREETING + Encoder().frame(Frame(OPEN, 2, "m", {}, None, False, None)),
                     "may not open"),
    "silence": (b"", "no greeting within 0.3 s"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
async def test_bad_input_closes_that_connection_only(
        case: str, make_peer: MakePeer, endpoints: Endpoints,
        caplog: pytest.LogCaptureFixture) -> None:
    data, reason = BAD_INPUTS[case]
    server = make_peer("server", max_frame_size=4096, greeting_timeout=0.3)
    server.handler = lambda channel: channel.write(b"pong", last=True)
    uri = await server.bind(endpoints())
    good = make_peer("good")
    await good.connect(uri)
    await good.wait_for_peers(timeout=3)
    reader, writer = await _raw(uri)
    with caplog.at_level(logging.WARNING, logger="consulate.control.duplex"):
        writer.write(data)
        received = await asyncio.wait_for(reader.read(), 3)  # until the server closes
    writer.close()
    await writer.wait_closed()
    assert isinstance(Decoder().feed(received)[0], Greeting)
    assert any(reason in record.getMessage() and "reason=" in record.getMessage()
               for record in caplog.records), [r.getMessage() for r in caplog.records]
    assert await good.open("ping", b"", last=True).receive() == b"pong"  # still serving
    assert [p.name for p in server.peers()] == ["good"]


async def test_a_peer_connected_to_itself_hangs_up(make_peer: MakePeer, endpoints: Endpoints,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    narcissus = make_peer("narcissus")
    with caplog.at_level(logging.WARNING, logger="consulate.control.duplex"):
        await narcissus.connect(await narcissus.bind(endpoints()))
        await asyncio.sleep(0.2)
    assert narcissus.peers() == []
    assert "connected to itself" in caplog.text


async def test_unbind_stops_new_connections_and_keeps_old_ones(make_peer: MakePeer,
                                                                endpoints: Endpoints) -> None:
    server, client, uri = await _pair(make_peer, endpoints)
    await server.unbind(uri)
    endpoint = parse(uri)
    if endpoint.scheme == "unix":
        assert not Path(endpoint.path).exists()
    with pytest.raises(OSError):
        await _raw(uri)
    client.open("still", b"here", last=True)
    _, channel = await server.accept()
    assert await channel.receive() == b"here"
    with pytest.raises(ValueError, match="is not bound by peer 'server'; bound: nothing"):
        await server.unbind(uri)


async def test_a_lost_connection_is_redialed_when_the_server_is_back(
        make_peer: MakePeer, endpoints: Endpoints) -> None:
    server, client, uri = await _pair(make_peer, endpoints)
    await server.shutdown(timeout=0.5)
    await asyncio.sleep(0.05)
    assert client.peers() == []
    again = make_peer("server-again")
    await again.bind(uri)
    [back] = await client.wait_for_peers(timeout=5)
    assert back.name == "server-again"
    await client.disconnect(uri)
    assert client.peers() == []
    with pytest.raises(ValueError, match="does not connect to"):
        await client.disconnect(uri)


async def test_a_slow_reader_pushes_back_on_the_sender(make_peer: MakePeer,
                                                       endpoints: Endpoints) -> None:
    server = make_peer("server", hwm=4)
    client = make_peer("client", hwm=4)
    await client.connect(await server.bind(endpoints()))
    await client.wait_for_peers(timeout=3)
    channel = client.open("download")
    _, accepted = await server.accept()
    chunk, count = b"x" * 65536, 400  # 26 MB: far beyond the socket buffers

    async def produce() -> None:
        for _ in range(count):
            await accepted.send(chunk)
        accepted.end()

    producer = asyncio.create_task(produce())
    await asyncio.sleep(0.3)
    assert not producer.done()  # blocked: the reader stopped reading at its hwm
    # reading stopped at the hwm, give or take the frames of the read that reached it
    assert 4 <= channel.buffered <= 4 + 256 * 1024 // len(chunk)
    assert sum([len(p) async for p in channel]) == len(chunk) * count
    await producer


async def test_shutdown_lets_open_channels_finish_then_refuses(make_peer: MakePeer,
                                                               endpoints: Endpoints) -> None:
    server, client, _ = await _pair(make_peer, endpoints)
    channel = client.open("slow", b"question", last=True)
    _, accepted = await server.accept()
    closing = asyncio.create_task(server.shutdown(timeout=3))
    await asyncio.sleep(0.1)
    assert not closing.done()  # draining
    assert await accepted.receive() == b"question"
    accepted.write(b"answer", last=True)
    assert await channel.receive() == b"answer"
    await asyncio.wait_for(closing, 3)
    with pytest.raises(PeerClosedError, match="was shut down"):
        server.open("m")
    with pytest.raises(PeerClosedError):
        await server.accept()


async def test_accept_is_not_for_a_peer_with_a_handler(make_peer: MakePeer) -> None:
    peer = make_peer("handled", handler=lambda channel: None)
    with pytest.raises(RuntimeError, match="gives its channels to its handler"):
        await peer.accept()


async def test_a_failing_handler_interrupts_its_channel_only(
        make_peer: MakePeer, endpoints: Endpoints, caplog: pytest.LogCaptureFixture) -> None:
    def handler(channel: object) -> None:
        raise RuntimeError("handler bug")

    server = make_peer("server", handler=handler)
    client = make_peer("client")
    await client.connect(await server.bind(endpoints()))
    with caplog.at_level(logging.ERROR, logger="consulate.control.duplex"), \
            pytest.raises(ChannelInterrupted, match="handler failed: RuntimeError: handler bug"):
        await client.open("m", b"", last=True).receive()
    assert "duplex handler failed" in caplog.text
    assert client.peers() != []


async def test_peer_options_are_checked(make_peer: MakePeer) -> None:
    with pytest.raises(ValueError, match="hwm must be at least 2"):
        Peer("x", hwm=1)
    peer = make_peer("x")
    await peer.connect("tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"already connects to tcp://127\.0\.0\.1:1"):
        await peer.connect("tcp://127.0.0.1:1")
    with contextlib.suppress(asyncio.TimeoutError), pytest.raises(TimeoutError):
        await peer.wait_for_peers(timeout=0.05)
