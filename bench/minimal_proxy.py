"""A minimal uvloop TCP proxy: the yardstick for consulate's Python relay.

The issue's target is that the Python relay, with its routing, retries and
counters, reaches at least 0.9x of this: two Protocols back to back, write
buffer flow control, half-close, nothing else. Not used by consulate itself.

    python -m bench.minimal_proxy LISTEN_HOST:PORT=TARGET_HOST:PORT [...]
"""

from __future__ import annotations

import asyncio
import socket
import sys

import uvloop


def _half_close(transport: asyncio.Transport) -> None:
    """shutdown(SHUT_WR), not write_eof(): uvloop 0.23 double-frees when a
    write_eof() is followed by close() under load (see proxy/relay.py)."""
    if transport.get_write_buffer_size():
        transport.close()  # rare here: flushes, then closes both ways
        return
    fd = transport.get_extra_info("socket").fileno()
    with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as dup:
        dup.shutdown(socket.SHUT_WR)


class _Side(asyncio.Protocol):
    def __init__(self, peer: _Side | None = None) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # read before the upstream connected
        self.eof = False

    def _other(self) -> asyncio.Transport | None:
        """The peer's transport while it can still be used."""
        if self.peer is None or self.peer.transport is None or self.peer.transport.is_closing():
            return None
        return self.peer.transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        other = self._other()
        if other is not None:
            other.write(data)
        elif self.peer is None:
            self.early.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self._other()
        if other is not None:
            _half_close(other)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        other = self._other()
        if other is not None:
            other.close()

    def pause_writing(self) -> None:
        other = self._other()
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self._other()
        if other is not None:
            other.resume_reading()


async def _serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def client_side() -> _Side:
        side = _Side()

        async def connect() -> None:
            assert side.transport is not None
            try:
                _, upstream = await loop.create_connection(lambda: _Side(side), *target)
            except OSError:
                side.transport.close()
                return
            side.peer = upstream
            assert upstream.transport is not None
            if side.transport.is_closing():  # the client left while we connected
                upstream.transport.close()
                return
            for chunk in side.early:
                upstream.transport.write(chunk)
            if side.eof:
                _half_close(upstream.transport)

        def start() -> None:
            task = loop.create_task(connect())
            tasks.add(task)  # a task nobody references can be collected mid-connect
            task.add_done_callback(tasks.discard)

        loop.call_soon(start)
        return side

    server = await loop.create_server(client_side, *listen, backlog=4096)
    await server.serve_forever()


async def _main(pairs: list[str]) -> None:
    tasks = []
    for pair in pairs:
        listen, target = pair.split("=")
        lhost, lport = listen.rsplit(":", 1)
        thost, tport = target.rsplit(":", 1)
        tasks.append(_serve((lhost, int(lport)), (thost, int(tport))))
    print("listening", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    uvloop.run(_main(sys.argv[1:]))
