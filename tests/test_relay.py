"""One relay suite, run against both relays: the native splice engine and the Python twin.

client <-> [relay] <-> server over real loopback TCP sockets. The test owns both
ends, so it checks exactly what each end sent and received.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import hashlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from consulate.native import capabilities
from consulate.native.engine import SpliceEngine
from consulate.native.model import RelayResult
from consulate.proxy.relay import PythonRelay, RelaySide

MiB = 1024 * 1024
RELAYS = ["native", "python"]


class Harness:
    """Builds relayed socket pairs; ``results`` collects the native engine's reports."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.front = socket.create_server(("127.0.0.1", 0))
        self.back = socket.create_server(("127.0.0.1", 0))
        self.results: list[RelayResult] = []
        self.closed_pairs = 0
        self.engine: SpliceEngine | None = None
        self.python = PythonRelay()
        self._ids = 0
        if kind == "native":
            self.engine = SpliceEngine()
            asyncio.get_running_loop().add_reader(self.engine.notify_fd, self._drain)

    def _drain(self) -> None:
        assert self.engine is not None
        self.results += self.engine.poll()

    def _count_closed(self) -> None:
        self.closed_pairs += 1

    async def pair(self) -> tuple[socket.socket, socket.socket]:
        """A (client, server) pair of blocking sockets with the relay in between."""
        client = socket.create_connection(self.front.getsockname())
        a, _ = self.front.accept()
        b = socket.create_connection(self.back.getsockname())
        server, _ = self.back.accept()
        a.setblocking(False)
        b.setblocking(False)
        self._ids += 1
        if self.engine is not None:
            self.engine.add(self._ids, a, b)
        else:
            await self.python.add(a, b, to_upstream=lambda n: None, to_client=lambda n: None,
                                  on_closed=self._count_closed)
        return client, server

    def finished(self) -> int:
        return len(self.results) if self.engine is not None else self.closed_pairs

    async def wait_finished(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.finished() < count:
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self.engine is not None:
            asyncio.get_running_loop().remove_reader(self.engine.notify_fd)
            self.results += self.engine.close()
            self.engine = None
        self.python.close()
        await asyncio.sleep(0.1)  # let asyncio run the transports close callbacks
        self.front.close()
        self.back.close()


@pytest.fixture(params=RELAYS)
async def relay(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "native":
        assert capabilities().extension and capabilities().splice, "native engine not built"
    harness = Harness(request.param)
    yield harness
    await harness.close()


def _sysctl_max(name: str) -> int:
    """The maximum of a "min default max" sysctl such as net/ipv4/tcp_rmem."""
    return int(Path("/proc/sys", name).read_text().split()[-1])


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def send_and_shut(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("size", [1, 64 * 1024, 50 * MiB])
async def test_payload_arrives_intact_both_ways(relay: Harness, size: int) -> None:
    client, server = await relay.pair()
    up, down = os.urandom(size), os.urandom(size)

    def serve() -> bytes:
        received = recv_all(server)
        send_and_shut(server, down)
        return received

    got_up, _, got_down = await asyncio.gather(
        asyncio.to_thread(serve),
        asyncio.to_thread(send_and_shut, client, up),
        asyncio.to_thread(recv_all, client),
    )
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest() and len(got_up) == size
    assert got_down == down
    client.close()
    server.close()
    await relay.wait_finished(1)
    if relay.engine is None and relay.results == []:
        return
    [result] = relay.results
    assert (result.reason, result.bytes_a_to_b, result.bytes_b_to_a) == ("done", size, size)
    if size == 50 * MiB:  # bulk goes through the pipes, not through user space
        assert result.spliced_a_to_b > 0.9 * size and result.spliced_b_to_a > 0.9 * size


async def test_half_close_client_first(relay: Harness) -> None:
    client, server = await relay.pair()
    answer = os.urandom(MiB)
    await asyncio.to_thread(send_and_shut, client, b"request")

    def serve() -> bytes:
        request = recv_all(server)  # ends with the client's EOF
        server.sendall(answer)
        server.close()
        return request

    assert await asyncio.to_thread(serve) == b"request"
    assert await asyncio.to_thread(recv_all, client) == answer
    client.close()


async def test_half_close_server_first(relay: Harness) -> None:
    client, server = await relay.pair()
    upload = os.urandom(MiB)
    await asyncio.to_thread(send_and_shut, server, b"greeting")
    assert await asyncio.to_thread(recv_all, client) == b"greeting"
    await asyncio.to_thread(send_and_shut, client, upload)
    assert await asyncio.to_thread(recv_all, server) == upload
    client.close()
    server.close()
    await relay.wait_finished(1)


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("who_resets", ["server", "client"])
async def test_reset_is_propagated(relay: Harness, who_resets: str) -> None:
    client, server = await relay.pair()
    resetter, other = (server, client) if who_resets == "server" else (client, server)
    other.settimeout(5)
    _reset(resetter)
    with pytest.raises(ConnectionResetError):
        await asyncio.to_thread(recv_all, other)
    other.close()
    await relay.wait_finished(1)
    if relay.engine is not None or relay.results:
        assert [r.reason for r in relay.results] == ["error"]


async def test_slow_reader_keeps_relay_buffers_bounded(relay: Harness) -> None:
    client, server = await relay.pair()
    server.setblocking(False)
    sent = received = 0
    chunk = b"x" * 65536
    deadline = time.monotonic() + 3.0

    def read_slowly() -> int:  # 100 KB/s
        total = 0
        while time.monotonic() < deadline:
            total += len(client.recv(10_000))
            time.sleep(0.1)
        return total

    reader = asyncio.ensure_future(asyncio.to_thread(read_slowly))
    while time.monotonic() < deadline:
        try:
            sent += server.send(chunk)
        except BlockingIOError:
            await asyncio.sleep(0.01)
    received = await reader
    # In flight: the kernel's socket buffers on both hops (receive buffers autotune
    # up to tcp_rmem's maximum while the relay still reads at full speed) plus the
    # relay's own (256 KiB for Python, a 1 MiB pipe for native). A relay that kept
    # reading would have taken in everything the server could write in 3 s:
    # gigabytes.
    assert 200_000 < received < 400_000
    kernel = 2 * _sysctl_max("net/ipv4/tcp_rmem") + 2 * _sysctl_max("net/ipv4/tcp_wmem")
    assert sent - received < kernel + 2 * MiB, (sent, received, kernel)
    client.close()
    server.close()


async def test_thousand_concurrent_connections(relay: Harness) -> None:
    pairs = [await relay.pair() for _ in range(1000)]

    def exchange() -> None:
        for n, (client, _) in enumerate(pairs):
            client.sendall(struct.pack("!I", n))
        for n, (client, server) in enumerate(pairs):
            assert server.recv(4) == struct.pack("!I", n)
            server.sendall(struct.pack("!I", n + 1))
            assert client.recv(4) == struct.pack("!I", n + 1)
        for client, server in pairs:
            client.close()
            server.close()

    await asyncio.to_thread(exchange)
    await relay.wait_finished(1000)


def _open_fds() -> list[str]:
    """What this process's descriptors point at (sockets, pipes, eventfds...)."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
    return sorted(t.split(":")[0] for t in targets)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("kind", RELAYS)
async def test_shutdown_with_open_connections_leaks_nothing(kind: str) -> None:
    # Warm up what the loop creates once and keeps (its executor thread, and a
    # socket uvloop opens on first use), so that only per-connection leaks count.
    warm = Harness(kind)
    for sock in await warm.pair():
        sock.close()
    await warm.close()
    await asyncio.to_thread(int)
    fds, threads = _open_fds(), _threads()
    harness = Harness(kind)
    pairs = [await harness.pair() for _ in range(20)]

    def ping() -> None:
        for client, server in pairs:
            client.sendall(b"ping")
            assert server.recv(4) == b"ping"

    def expect_clean_close() -> None:
        for client, server in pairs:
            client.settimeout(5)
            server.settimeout(5)
            assert client.recv(1) == b""  # a clean close, not a reset
            assert server.recv(1) == b""
            client.close()
            server.close()

    await asyncio.to_thread(ping)  # blocking calls off the loop: the Python relay runs on it
    await harness.close()
    await asyncio.to_thread(expect_clean_close)
    if kind == "native":
        assert [r.reason for r in harness.results] == ["stopped"] * 20
    assert _open_fds() == fds  # no socket, pipe, eventfd or epoll fd left
    assert _threads() == threads  # the engine's thread is gone


async def test_many_short_connections_closed_by_the_server(relay: Harness) -> None:
    """Request, a 1 MiB answer, the server closes first; 32 connections at a time.

    The half-close reaches the client only after the buffered answer (the Python
    relay defers its FIN until the buffer drains, see proxy/relay.py
    ``_forward_eof``), and every answer arrives whole.
    """
    # Large enough that the relay still holds some of it when the server's EOF comes.
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * (1 << 20)

    def exchange(pair: tuple[socket.socket, socket.socket]) -> bytes:
        client, server = pair
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        server.recv(100)
        server.sendall(answer)
        server.close()
        got = recv_all(client)
        client.close()
        return got

    rounds = 10
    for _ in range(rounds):
        pairs = [await relay.pair() for _ in range(32)]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            got = await asyncio.get_running_loop().run_in_executor(
                None, lambda: list(pool.map(exchange, pairs)))  # noqa: B023
        assert got == [answer] * 32
    await relay.wait_finished(rounds * 32)


async def test_python_pairs_are_freed_by_refcounting_not_the_garbage_collector() -> None:
    """A finished pair leaves no reference cycle behind: the agent relays thousands
    of connections a second, and cycles would hand every one to the collector,
    whose passes over the agent's heap then cost more than the relaying."""
    harness = Harness("python")
    gc.collect()
    gc.disable()
    try:
        pairs = [await harness.pair() for _ in range(20)]

        def exchange() -> list[bytes]:
            got = []
            for client, server in pairs:
                client.sendall(b"ping")
                got.append(server.recv(4))
                server.close()
                client.close()
            return got

        assert await asyncio.get_running_loop().run_in_executor(None, exchange) == \
            [b"ping"] * 20
        await harness.wait_finished(20)
        await asyncio.sleep(0.1)  # uvloop lets go of closed transports a turn later
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, RelaySide)]
        assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        await harness.close()
