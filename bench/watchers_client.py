"""One watcher client process of bench/watchers.py: thousands of watchers on one agent.

    python -m bench.watchers_client HOST PORT MODE

MODE is ``poll`` (Discoverd long poll, ``GET /v1/discover/services/<s>/instances
?index=N&wait=10m``), ``sse`` (the same path with ``Accept: text/event-stream``)
or ``consul`` (the Consul blocking query ``GET /v1/catalog/service/<s>?index=N&wait=10m``).
A long-poll watcher behaves as Consul's and Discoverd's clients do: one plain
GET for the current index, then blocking GETs on the same keep-alive connection,
each with the index the previous answer carried. A stream watcher reads the
initial instances up to ``current``, then live events.

The process is driven by JSON lines on stdin and answers one JSON line each on
stdout (bench/watchers.py holds the other end):

- ``{"op": "open", "watchers": [[service_number, name], ...]}``: one new watcher
  per entry; answers once each is in place (its blocking GET sent, or its stream
  past ``current``) or failed;
- ``{"op": "count", "service": N}``: how many wake-ups wait to be collected, in all
  and of service N (a small answer, for polling);
- ``{"op": "drain"}``: the wake-ups since the last drain, ``[service_number, t]``
  with ``t`` from CLOCK_MONOTONIC (system-wide, so comparable with the writer's
  clock), plus counters (timeouts, errors, other events);
- ``{"op": "close"}``: close every connection, answer, exit.

The HTTP client is a plain asyncio protocol on uvloop, not aiohttp's client: a
wake-up is stamped in ``data_received`` of the bytes that complete it, and the
client's own cost per wake-up stays small next to the agent's (the Consul
baseline wakes 10,000 watchers per write).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from typing import Any, cast

import uvloop

WAIT = "10m"  # longer than any phase of the benchmark: a long poll returns only on a change
CONNECTING = 32  # connections being set up at once per client (the agent's backlog is 128)
OPEN_TIMEOUT = 120.0


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class Client:
    """The watchers of this process and what they saw."""

    def __init__(self, host: str, port: int, mode: str) -> None:
        self.host, self.port, self.mode = host, port, mode
        self.watchers: list[Watcher] = []
        self.wakes: list[tuple[int, float]] = []
        self.timeouts = 0  # long polls that answered with an unchanged index
        self.errors: list[str] = []
        self.events: dict[str, int] = {}  # stream events other than the expected "up"
        self.closing = False
        self._slots = asyncio.Semaphore(CONNECTING)

    async def open(self, entries: list[tuple[int, str]]) -> dict[str, Any]:
        errors = len(self.errors)
        loop = asyncio.get_running_loop()
        ready: list[asyncio.Future[None]] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(OPEN_TIMEOUT):
                for number, name in entries:
                    await self._slots.acquire()
                    done = loop.create_future()
                    ready.append(done)
                    done.add_done_callback(lambda _f: self._slots.release())
                    watcher = Watcher(self, number, name, done)
                    self.watchers.append(watcher)
                    loop.create_task(self._connect(watcher)).add_done_callback(_ignore)
                await asyncio.gather(*ready, return_exceptions=True)
        established = sum(1 for f in ready
                          if f.done() and not f.cancelled() and f.exception() is None)
        return {"established": established, "errors": self.errors[errors:][:5],
                "error_count": len(self.errors) - errors, "total": len(self.watchers)}

    async def _connect(self, watcher: Watcher) -> None:
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: watcher, self.host, self.port)
        except OSError as exc:
            watcher.fail(f"connect: {exc}")

    def drain(self) -> dict[str, Any]:
        wakes, self.wakes = self.wakes, []
        return {"wakes": wakes, "timeouts": self.timeouts, "errors": len(self.errors),
                "error_samples": self.errors[-3:], "events": self.events,
                "open": sum(1 for w in self.watchers if w.transport is not None)}

    def close(self) -> None:
        self.closing = True
        for watcher in self.watchers:
            if watcher.transport is not None:
                watcher.transport.close()


def _ignore(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class Watcher(asyncio.Protocol):
    """One connection: a long-poll loop or one event stream."""

    def __init__(self, client: Client, number: int, name: str,
                 ready: asyncio.Future[None]) -> None:
        self.client, self.number, self.name, self.ready = client, number, name, ready
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.index: int | None = None
        self.headers: dict[str, str] | None = None  # of the response being read
        self.body = bytearray()  # the stream's de-chunked body not yet parsed
        self.current = False  # the stream is past its initial instances

    # -- asyncio -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass of it
        self._request(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.client.closing:
            self.fail(f"connection lost: {exc or 'closed by the agent'}")

    def data_received(self, data: bytes) -> None:
        stamp = now()
        self.buffer += data
        try:
            if self.client.mode == "sse":
                self._stream(stamp)
            else:
                while self._response(stamp):
                    pass
        except ValueError as exc:
            self.fail(f"bad response: {exc}")
            if self.transport is not None:
                self.transport.close()

    def fail(self, why: str) -> None:
        self.client.errors.append(f"{self.name}: {why}")
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(why))

    # -- requests ------------------------------------------------------------------

    def _request(self, index: int | None) -> None:
        assert self.transport is not None
        mode = self.client.mode
        path = (f"/v1/catalog/service/{self.name}" if mode == "consul"
                else f"/v1/discover/services/{self.name}/instances")
        if index is not None:
            path += f"?index={index}&wait={WAIT}"
        accept = "text/event-stream" if mode == "sse" else "application/json"
        self.transport.write(f"GET {path} HTTP/1.1\r\nHost: {self.client.host}\r\n"
                             f"Accept: {accept}\r\n\r\n".encode())

    def _head(self) -> bool:
        """Parse a status line and headers off the buffer; False until they are in."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[:end + 4]
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "200":
            raise ValueError(f"status line {lines[0]!r}")
        self.headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            self.headers[key.strip().lower()] = value.strip()
        return True

    # -- long polls ------------------------------------------------------------------

    def _response(self, stamp: float) -> bool:
        """Handle one complete response if the buffer holds one; True if it did."""
        if self.headers is None and not self._head():
            return False
        assert self.headers is not None
        length = int(self.headers.get("content-length", "-1"))
        if length < 0:
            raise ValueError("no Content-Length in a long-poll answer")
        if len(self.buffer) < length:
            return False
        del self.buffer[:length]
        key = "x-consul-index" if self.client.mode == "consul" else "x-discoverd-index"
        index = int(self.headers[key])
        self.headers = None
        asked = self.index
        self.index = index
        if asked is None:  # the plain GET: now block
            self._request(index)
            if not self.ready.done():
                self.ready.set_result(None)
        else:
            if index > asked:
                self.client.wakes.append((self.number, stamp))
            else:
                self.client.timeouts += 1
            self._request(index)
        return True

    # -- event streams ---------------------------------------------------------------

    def _stream(self, stamp: float) -> None:
        if self.headers is None:
            if not self._head():
                return
            assert self.headers is not None
            if self.headers.get("transfer-encoding", "").lower() != "chunked":
                raise ValueError("the event stream is not chunked")
        while True:  # de-chunk what is complete
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            size = int(bytes(self.buffer[:end]).split(b";")[0], 16)
            if len(self.buffer) < end + 2 + size + 2:
                break
            if size == 0:
                raise ValueError("the agent ended the stream")
            self.body += self.buffer[end + 2:end + 2 + size]
            del self.buffer[:end + 2 + size + 2]
        while (end := self.body.find(b"\n\n")) >= 0:
            frame = bytes(self.body[:end]).decode()
            del self.body[:end + 2]
            kind = next((line[6:].strip() for line in frame.split("\n")
                         if line.startswith("event:")), "")
            if kind == "current":
                self.current = True
                if not self.ready.done():
                    self.ready.set_result(None)
            elif self.current and kind == "up":
                self.client.wakes.append((self.number, stamp))
            elif self.current:
                self.client.events[kind] = self.client.events.get(kind, 0) + 1


async def serve(host: str, port: int, mode: str) -> None:
    client = Client(host, port, mode)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        command = json.loads(line)
        op = command["op"]
        if op == "open":
            answer(await client.open([(int(n), str(s)) for n, s in command["watchers"]]))
        elif op == "count":
            number = command.get("service")
            answer({"wakes": len(client.wakes), "errors": len(client.errors),
                    "own": sum(1 for n, _ in client.wakes if n == number)})
        elif op == "drain":
            answer(client.drain())
        elif op == "close":
            client.close()
            await asyncio.sleep(0.1)
            answer({"closed": len(client.watchers)})
            return
        else:
            answer({"error": f"unknown op {op!r}"})
    client.close()  # stdin closed: the benchmark is gone


def main() -> int:
    host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode not in ("poll", "sse", "consul"):
        print(f"unknown mode {mode!r}: use poll, sse or consul", file=sys.stderr)
        return 2
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the parent raised hard
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(host, port, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
