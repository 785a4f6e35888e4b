"""Duplex RPC over tcp (127.0.0.1) and unix sockets: the four call shapes, errors,
interrupts, targeted and symmetric calls, codecs, headers."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from duplexfix import Endpoints

from consulate.control.duplex import (
    ChannelInterrupted,
    ConnectionLost,
    JsonCodec,
    NoPeerError,
    RemoteError,
    RPCPeer,
    current_channel,
    stream_input,
)

MakePeer = Callable[..., RPCPeer]




@pytest.fixture
async def make_peer() -> AsyncIterator[MakePeer]:
    made: list[RPCPeer] = []

    def make(name: str, **options: Any) -> RPCPeer:
        options.setdefault("open_timeout", 3.0)
        made.append(RPCPeer(name, **options))
        return made[-1]

    yield make
    await asyncio.gather(*(peer.shutdown(timeout=0.2) for peer in made))


class Calculator:
    """What a service object looks like: every public method is served."""

    def __init__(self) -> None:
        self.stopped = asyncio.Event()

    def add(self, a: int, b: int) -> int:
        return a + b

    async def slow_double(self, x: int) -> int:
        await asyncio.sleep(0.01)
        return 2 * x

    def divide(self, a: float, b: float) -> float:
        return a / b

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def forever(self) -> AsyncIterator[int]:
        try:
            for i in itertools.count():
                yield i
                await asyncio.sleep(0.001)
        finally:
            self.stopped.set()

    @stream_input
    async def total(self, numbers: AsyncIterator[int]) -> int:
        return sum([n async for n in numbers])

    @stream_input
    async def upper(self, words: AsyncIterator[str]) -> AsyncIterator[str]:
        async for word in words:
            yield word.upper()

    async def sleep(self, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        finally:
            self.stopped.set()

    def whoami(self) -> dict[str, Any]:
        channel = current_channel()
        assert channel.peer is not None
        return {"headers": channel.headers, "caller": channel.peer.name}

    def unencodable(self) -> object:
        return object()


async def _served(make_peer: MakePeer, endpoints: Endpoints,
                  **options: Any) -> tuple[RPCPeer, RPCPeer, Calculator]:
    server, client = make_peer("server", **options), make_peer("client", **options)
    calc = Calculator()
    assert "calc.add" in server.register(calc, "calc")
    await client.connect(await server.bind(endpoints()))
    await client.wait_for_peers(timeout=3)
    return server, client, calc


async def test_simple_and_async_calls(make_peer: MakePeer, endpoints: Endpoints) -> None:
    _, client, _ = await _served(make_peer, endpoints)
    assert await client.call("calc.add", 2, 3) == 5
    assert await client.call("calc.slow_double", 21) == 42
    results = await asyncio.gather(*(client.call("calc.add", i, i) for i in range(100)))
    assert results == [2 * i for i in range(100)]


async def test_register_function_and_the_default_prefix(make_peer: MakePeer,
                                                        endpoints: Endpoints) -> None:
    server, client, _ = await _served(make_peer, endpoints)
    server.register_function("echo", lambda value: value)
    assert "Calculator.add" in server.register(Calculator())
    assert await client.call("echo", {"nested": [1, b"\x00", None]}) == {"nested": [1, b"\x00",
                                                                                   None]}
    assert await client.call("Calculator.add", 1, 1) == 2
    with pytest.raises(TypeError, match="is not callable"):
        server.register_function("x", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no public method"):
        server.register(object())


async def test_server_client_and_bidirectional_streams(make_peer: MakePeer,
                                                       endpoints: Endpoints) -> None:
    _, client, _ = await _served(make_peer, endpoints)
    assert [i async for i in client.stream("calc.count", 5)] == [0, 1, 2, 3, 4]
    assert [i async for i in client.stream("calc.count", 0)] == []
    assert await client.send_stream("calc.total", range(1000)) == sum(range(1000))

    async def words() -> AsyncIterator[str]:
        for word in ("duplex", "is", "back"):
            yield word

    assert [w async for w in client.exchange("calc.upper", words())] == ["DUPLEX", "IS", "BACK"]


async def test_a_reader_that_stops_interrupts_the_remote_generator(
        make_peer: MakePeer, endpoints: Endpoints) -> None:
    _, client, calc = await _served(make_peer, endpoints)
    async with client.stream("calc.forever") as numbers:
        async for n in numbers:
            if n == 3:
                break
    await asyncio.wait_for(calc.stopped.wait(), 3)
    assert await client.call("calc.add", 1, 2) == 3  # the connection is fine


async def test_a_failing_input_stream_interrupts_the_call(make_peer: MakePeer,
                                                          endpoints: Endpoints) -> None:
    _, client, _ = await _served(make_peer, endpoints)

    async def broken() -> AsyncIterator[str]:
        yield "one"
        raise OSError("disk gone")

    with pytest.raises(ChannelInterrupted, match="input failed: OSError: disk gone"):
        async with client.exchange("calc.upper", broken()) as replies:
            async for _ in replies:
                pass
    with pytest.raises(OSError, match="disk gone"):
        await client.send_stream("calc.total", broken())


async def test_a_timeout_interrupts_the_remote_call(make_peer: MakePeer,
                                                    endpoints: Endpoints) -> None:
    _, client, calc = await _served(make_peer, endpoints)
    with pytest.raises(TimeoutError):
        await client.call("calc.sleep", 30, timeout=0.05)
    await asyncio.wait_for(calc.stopped.wait(), 3)  # the remote task was cancelled


@pytest.mark.parametrize(("call", "message"), [
    (("calc.nope",), "unknown method 'calc.nope' (peer 'server' serves: calc.add, calc.count"),
    (("calc.add", 1), "bad arguments for calc.add(a, b): "),
    (("calc.add", 1, 2, 3), "bad arguments for calc.add(a, b): "),
    (("calc.divide", 1, 0), "calc.divide failed: ZeroDivisionError: division by zero"),
    (("calc.add", "a", 1), "calc.add failed: TypeError: can only concatenate str"),
    (("calc.unencodable",), "cannot encode the result of calc.unencodable with msgpack"),
])
async def test_remote_errors_carry_the_remote_message(call: tuple[Any, ...], message: str,
                                                      make_peer: MakePeer,
                                                      endpoints: Endpoints) -> None:
    _, client, _ = await _served(make_peer, endpoints)
    with pytest.raises(RemoteError) as caught:
        await client.call(*call)
    assert message in caught.value.message
    assert caught.value.method == call[0]
    assert await client.call("calc.add", 1, 2) == 3  # errors end one call, nothing else


async def test_a_call_with_no_peer_fails_within_its_timeout(make_peer: MakePeer) -> None:
    lonely = make_peer("lonely", open_timeout=0.1)
    with pytest.raises(NoPeerError, match=r"no peer connected within 0\.1 s to open 'calc\.add'"):
        await lonely.call("calc.add", 1, 2)


async def test_calls_to_a_chosen_peer(make_peer: MakePeer, endpoints: Endpoints) -> None:
    client = make_peer("client")
    for name in ("east", "west"):
        server = make_peer(name)
        server.register_function("where", lambda name=name: name)
        await client.connect(await server.bind(endpoints()))
    await client.wait_for_peers(2, timeout=3)
    assert {await client.call("where") for _ in range(4)} == {"east", "west"}
    west = next(p for p in client.peers() if p.name == "west")
    assert {await client.call("where", peer=west) for _ in range(4)} == {"west"}
    assert await client.call("where", peer="east") == "east"
    with pytest.raises(NoPeerError, match="no connected peer 'north'"):
        await client.call("where", peer="north")


async def test_the_binder_calls_the_connector(make_peer: MakePeer, endpoints: Endpoints) -> None:
    server, client, _ = await _served(make_peer, endpoints)
    client.register_function("hello", lambda who: f"hello {who}, from the client")
    await server.wait_for_peers(timeout=3)
    assert await server.call("hello", "server") == "hello server, from the client"


async def test_dropping_the_peer_fails_calls_in_flight(make_peer: MakePeer,
                                                       endpoints: Endpoints) -> None:
    server, client, _ = await _served(make_peer, endpoints)
    call = asyncio.create_task(client.call("calc.sleep", 30))
    await asyncio.sleep(0.05)
    server.drop(client.id)
    with pytest.raises(ConnectionLost, match=r"connection to server \(.*\) lost"):
        await call


async def test_headers_reach_the_served_function(make_peer: MakePeer,
                                                 endpoints: Endpoints) -> None:
    _, client, _ = await _served(make_peer, endpoints)
    assert await client.call("calc.whoami", headers={"trace-id": "t-1"}) == {
        "headers": {"trace-id": "t-1"}, "caller": "client"}
    with pytest.raises(LookupError):
        current_channel()


async def test_the_json_codec(make_peer: MakePeer, endpoints: Endpoints) -> None:
    _, client, _ = await _served(make_peer, endpoints, codec=JsonCodec())
    assert await client.call("calc.add", 2, 3) == 5
    assert [i async for i in client.stream("calc.count", 3)] == [0, 1, 2]
    with pytest.raises(TypeError, match="not JSON serializable"):
        await client.call("calc.add", b"bytes", 1)


async def test_mismatched_codecs_say_which_codec_failed(make_peer: MakePeer,
                                                        endpoints: Endpoints) -> None:
    server = make_peer("server", codec=JsonCodec())
    server.register(Calculator(), "calc")
    client = make_peer("client")
    await client.connect(await server.bind(endpoints()))
    with pytest.raises(RemoteError, match=r"cannot decode the arguments of calc\.add with json"):
        await client.call("calc.add", 1, 2)
