"""Duplex benchmark: consulate's duplex RPC against aiohttp (JSON over HTTP/1.1) and raw
msgpack over asyncio streams, same machine, same run.

For each transport (unix socket, TCP on 127.0.0.1) and repetition, the three
variants take turns (in an order rotated by one per repetition), each with a
fresh server process pinned to CPU 0 and a client process pinned to CPU 1, both
on uvloop:

- unary-1, unary-32: the client calls ``echo`` with a small map (5 fields) and
  checks the answer, with 1 and 32 calls in flight, for ``--duration`` seconds;
  calls/s. duplex: ``RPCPeer.call`` on one connection (a plain ``def``, served
  inline); aiohttp: POST /echo with a JSON body on a keep-alive pool of as many
  connections as calls in flight (HTTP/1.1 has no multiplexing); raw msgpack:
  ``[id, payload]`` requests pipelined on one connection, answers matched by id,
  the least any RPC over msgpack can do;
- stream: the server sends 64 KiB messages as fast as the client reads them, for
  ``--duration`` seconds; MB/s (10^6 B/s) of message payload received. duplex: a
  server-streaming RPC (an async generator) the client reads with ``async for``,
  then interrupts; aiohttp: a chunked response body; raw msgpack: a stream of
  msgpack bin objects the client unpacks.

Server and client CPU are user+system time over the measured window, 100 % = one
core. Results go to ``duplex.md``, one PNG per test and transport, and the raw
samples in ``duplex.json``.

    python -m bench.duplex [--reps 3] [--duration 2] [--transports unix,tcp]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bench/duplex.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import msgpack
import uvloop
from aiohttp import web

from bench import report
from bench.machine import cpu_model
from bench.peers import taskset
from bench.report import Metric, Section
from bench.signals import run_main
from consulate.control import duplex

SERVER_CPUS = {0}
CLIENT_CPUS = {1}
RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "consulate-duplex": "consulate.control.duplex RPCPeer, msgpack codec, one connection",
    "aiohttp-json": f"aiohttp {importlib.metadata.version('aiohttp')} web server and "
                    "ClientSession, JSON bodies, keep-alive pool sized to the calls in "
                    "flight, access log off",
    "raw-msgpack": "asyncio streams + msgpack, [id, payload] pipelined on one connection, "
                   "no framing beyond msgpack's own: a floor for RPC over msgpack",
}
PAYLOAD = {"id": 12345, "name": "web-1", "address": "10.0.0.5", "port": 8080,
           "tags": ["a", "b"]}
CHUNK = 64 * 1024
READY = "ready"

CALLS = Metric("calls", "calls", "calls/s", True, 0)
MBPS = Metric("mbps", "throughput", "MB/s", True, 0)
SERVER_CPU = Metric("server_cpu", "server CPU", "% of a core", False, 0)
# CPU time per unit of work: what a busy machine (the run shares its cores) moves least
SERVER_US_PER_CALL = Metric("server_cost", "server CPU per call", "µs", False, 1)
SERVER_US_PER_MB = Metric("server_cost", "server CPU per MB", "µs", False, 0)
CLIENT_CPU = Metric("client_cpu", "client CPU", "% of a core", False, 0)


@dataclass(frozen=True)
class Test:
    key: str  # also the client's test argument
    title: str
    metric: Metric
    cost: Metric
    concurrency: int


TESTS = (
    Test("unary-1", "Unary calls, 1 in flight", CALLS, SERVER_US_PER_CALL, 1),
    Test("unary-32", "Unary calls, 32 in flight", CALLS, SERVER_US_PER_CALL, 32),
    Test("stream", "Server streaming, 64 KiB messages", MBPS, SERVER_US_PER_MB, 1),
)


def _section(test: Test, transport: str) -> Section:
    return Section(f"{test.key}-{transport}", f"{test.title}, over {transport}",
                   (test.metric,), f"duplex-{test.key}-{transport}.png",
                   (test.cost, SERVER_CPU, CLIENT_CPU), versus=("aiohttp-json", "raw-msgpack"))


# -- servers (run in their own process: `python -m bench.duplex serve VARIANT URI`) -------


def _echo(value: Any) -> Any:
    return value


async def _chunks(size: int) -> AsyncIterator[bytes]:
    chunk = b"x" * size
    while True:
        yield chunk


async def _serve_duplex(uri: str) -> None:
    peer = duplex.RPCPeer("bench-server")
    peer.register_function("echo", _echo)
    peer.register_function("chunks", _chunks)
    await peer.bind(uri)
    print(READY, flush=True)
    await asyncio.Event().wait()


async def _serve_aiohttp(uri: str) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response(await request.json())

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * int(request.query["size"])
        try:
            while True:
                await response.write(chunk)
        except ConnectionError:
            return response  # the client read enough

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    endpoint = duplex.parse(uri)
    site: web.BaseSite = (web.UnixSite(runner, endpoint.path) if endpoint.scheme == "unix"
                          else web.TCPSite(runner, endpoint.host, endpoint.port))
    await site.start()
    print(READY, flush=True)
    await asyncio.Event().wait()


async def _serve_raw(uri: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker, pack = msgpack.Unpacker(), msgpack.Packer().pack
        try:
            while data := await reader.read(262144):
                unpacker.feed(data)
                for message in unpacker:
                    if message[0] == "stream":
                        chunk = pack(b"x" * message[1])
                        while True:
                            writer.write(chunk)
                            await writer.drain()
                    writer.write(pack(message))  # [id, payload]: the echo
        except ConnectionError:
            pass  # the client is done
        finally:
            writer.close()

    endpoint = duplex.parse(uri)
    if endpoint.scheme == "unix":
        await asyncio.start_unix_server(handle, endpoint.path)
    else:
        await asyncio.start_server(handle, endpoint.host, endpoint.port)
    print(READY, flush=True)
    await asyncio.Event().wait()


SERVERS: dict[str, Callable[[str], Awaitable[None]]] = {
    "consulate-duplex": _serve_duplex, "aiohttp-json": _serve_aiohttp, "raw-msgpack": _serve_raw}


# -- clients (`python -m bench.duplex client VARIANT URI TEST CONCURRENCY DURATION PID`) ---


class Window:
    """The measured window: wall time, this process's CPU, the server's CPU."""

    def __init__(self, server_pid: int, duration: float) -> None:
        self.server_pid, self.duration = server_pid, duration
        self.deadline = time.monotonic() + duration
        self._start = (time.monotonic(), time.process_time(), _cpu_seconds(server_pid))

    def over(self) -> bool:
        return time.monotonic() >= self.deadline

    def result(self, metric: Metric, amount: float) -> dict[str, float]:
        """``amount`` calls or MB in the window: the rate, CPU shares, server cost."""
        wall = time.monotonic() - self._start[0]
        server = _cpu_seconds(self.server_pid) - self._start[2]
        return {metric.key: amount / wall,
                CLIENT_CPU.key: 100 * (time.process_time() - self._start[1]) / wall,
                SERVER_CPU.key: 100 * server / wall,
                SERVER_US_PER_CALL.key: 1e6 * server / amount}


def _cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def _workers(concurrency: int, window: Window,
                   call: Callable[[], Awaitable[Any]]) -> int:
    """Keep ``concurrency`` calls in flight until the window is over; count them."""
    done = 0

    async def worker() -> None:
        nonlocal done
        while not window.over():
            if await call() != PAYLOAD:
                raise AssertionError("wrong answer")
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def _client_duplex(uri: str, test: Test, window_for: Callable[[], Window]
                         ) -> dict[str, float]:
    peer = duplex.RPCPeer("bench-client")
    await peer.connect(uri)
    await peer.wait_for_peers(timeout=10)
    try:
        window = window_for()
        if test.metric is CALLS:
            calls = await _workers(test.concurrency, window, lambda: peer.call("echo", PAYLOAD))
            return window.result(CALLS, calls)
        received = 0
        async with peer.stream("chunks", CHUNK) as chunks:
            async for chunk in chunks:
                received += len(chunk)
                if window.over():
                    break
        return window.result(MBPS, received / 1e6)
    finally:
        await peer.shutdown(timeout=1)


async def _client_aiohttp(uri: str, test: Test, window_for: Callable[[], Window]
                          ) -> dict[str, float]:
    endpoint = duplex.parse(uri)
    connector = (aiohttp.UnixConnector(endpoint.path, limit=test.concurrency)
                 if endpoint.scheme == "unix" else aiohttp.TCPConnector(limit=test.concurrency))
    base = "http://localhost" if endpoint.scheme == "unix" else (
        f"http://{endpoint.host}:{endpoint.port}")
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call() -> Any:
            async with session.post(f"{base}/echo", json=PAYLOAD) as response:
                return await response.json()

        await call()  # connect before the window
        window = window_for()
        if test.metric is CALLS:
            return window.result(CALLS, await _workers(test.concurrency, window, call))
        received = 0
        async with session.get(f"{base}/stream", params={"size": str(CHUNK)}) as response:
            while not window.over():
                received += len(await response.content.readany())
        return window.result(MBPS, received / 1e6)


async def _client_raw(uri: str, test: Test, window_for: Callable[[], Window]
                      ) -> dict[str, float]:
    endpoint = duplex.parse(uri)
    reader, writer = await (asyncio.open_unix_connection(endpoint.path)
                            if endpoint.scheme == "unix"
                            else asyncio.open_connection(endpoint.host, endpoint.port))
    unpacker, pack = msgpack.Unpacker(), msgpack.Packer().pack
    try:
        window = window_for()
        if test.metric is MBPS:
            writer.write(pack(["stream", CHUNK]))
            received = 0
            while not window.over():
                unpacker.feed(await reader.read(262144))
                received += sum(len(chunk) for chunk in unpacker)
            return window.result(MBPS, received / 1e6)
        loop = asyncio.get_running_loop()
        pending: dict[int, asyncio.Future[Any]] = {}
        ids = itertools.count()

        async def read_answers() -> None:
            while data := await reader.read(262144):
                unpacker.feed(data)
                for call_id, payload in unpacker:
                    pending.pop(call_id).set_result(payload)

        async def call() -> Any:
            call_id = next(ids)
            pending[call_id] = future = loop.create_future()
            writer.write(pack([call_id, PAYLOAD]))
            return await future

        answers = asyncio.create_task(read_answers())
        try:
            return window.result(CALLS, await _workers(test.concurrency, window, call))
        finally:
            answers.cancel()
    finally:
        writer.close()


CLIENTS = {"consulate-duplex": _client_duplex, "aiohttp-json": _client_aiohttp,
           "raw-msgpack": _client_raw}


def _child(argv: Sequence[str]) -> int:
    """The server or client side, in this process. It has nothing to clean up, so the
    orchestrator's SIGTERM (or a Ctrl-C to the group) simply ends it."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    if argv[0] == "serve":
        uvloop.run(SERVERS[argv[1]](argv[2]))
        return 0
    variant, uri, test_key, duration, server_pid = argv[1:6]
    test = next(t for t in TESTS if t.key == test_key)
    sample = uvloop.run(CLIENTS[variant](
        uri, test, lambda: Window(int(server_pid), float(duration))))
    print(json.dumps(sample), flush=True)
    return 0


# -- the run --------------------------------------------------------------------------------


class Server:
    """A server process of one variant, pinned; stopped by its PID."""

    def __init__(self, variant: str, uri: str, pin: bool) -> None:
        self.proc = subprocess.Popen(
            [*taskset(SERVER_CPUS if pin else None), sys.executable, "-m", "bench.duplex",
             "serve", variant, uri], stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parent.parent)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != READY:
            self.stop()
            raise RuntimeError(f"{variant} server did not start (exit {self.proc.returncode})")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _measure(variant: str, uri: str, test: Test, server: Server, args: argparse.Namespace,
             pin: bool) -> dict[str, float]:
    done = subprocess.run(
        [*taskset(CLIENT_CPUS if pin else None), sys.executable, "-m", "bench.duplex",
         "client", variant, uri, test.key, str(args.duration), str(server.proc.pid)],
        capture_output=True, text=True, timeout=60 + args.duration,
        cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                           else f"client exited {done.returncode}")
    sample: dict[str, float] = json.loads(done.stdout)
    return sample


def _uri(transport: str, work: Path, port: int) -> str:
    return f"unix://{work}/bench.sock" if transport == "unix" else f"tcp://127.0.0.1:{port}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("serve", "client"):
        return _child(argv)
    args = _parse_args(argv)
    pin = not args.no_pin and os.sched_getaffinity(0) >= SERVER_CPUS | CLIENT_CPUS
    variants = list(VARIANTS)
    sections = [_section(test, transport) for transport in args.transports for test in TESTS]
    results: report.Results = {s.key: {v: report.Cell() for v in variants} for s in sections}
    work = Path(tempfile.mkdtemp(prefix="dpx-bench-", dir="/tmp"))
    started = time.monotonic()
    try:
        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", flush=True)
            turn = rep % len(variants)
            for transport in args.transports:
                for variant in variants[turn:] + variants[:turn]:
                    _run_variant(variant, transport, work, rep, args, pin, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    _write(args, pin, elapsed, variants, sections, results)
    print(f"done in {elapsed / 60:.1f} min: {args.out / 'duplex.md'}")
    return 0


def _run_variant(variant: str, transport: str, work: Path, rep: int, args: argparse.Namespace,
                 pin: bool, results: report.Results) -> None:
    uri = _uri(transport, work, _free_port())
    try:
        server = Server(variant, uri, pin)
    except (RuntimeError, OSError) as exc:
        for test in TESTS:
            results[f"{test.key}-{transport}"][variant].errors.append(f"rep {rep + 1}: {exc}")
        print(f"  {variant:<13} {transport:<5} FAILED to start: {exc}", flush=True)
        return
    try:
        for test in TESTS:
            cell = results[f"{test.key}-{transport}"][variant]
            try:
                sample = _measure(variant, uri, test, server, args, pin)
            except (RuntimeError, subprocess.SubprocessError) as exc:
                cell.errors.append(f"rep {rep + 1}: {exc}")
                print(f"  {variant:<13} {transport:<5} {test.key:<9} FAILED: {exc}", flush=True)
                continue
            cell.samples.append(sample)
            print(f"  {variant:<13} {transport:<5} {test.key:<9} " + "  ".join(
                f"{key}={value:,.0f}" for key, value in sample.items()), flush=True)
    finally:
        server.stop()
        if transport == "unix":
            Path(uri[len("unix://"):]).unlink(missing_ok=True)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.duplex",
        description="Measure duplex RPC against aiohttp JSON and raw msgpack over asyncio "
                    "streams, over unix sockets and TCP on 127.0.0.1.")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--duration", type=float, default=2.0,
                        help="seconds per measurement (default 2)")
    parser.add_argument("--transports", default="unix,tcp",
                        help="comma-separated: unix, tcp (default both)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"directory for duplex.md, charts and duplex.json (default {RESULTS})")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin server and client to separate cores")
    args = parser.parse_args(argv)
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not args.transports or set(args.transports) - {"unix", "tcp"}:
        parser.error(f"--transports takes unix and/or tcp, got {args.transports}")
    if args.reps < 1 or args.duration <= 0:
        parser.error("--reps must be at least 1 and --duration above 0")
    return args


def _write(args: argparse.Namespace, pin: bool, elapsed: float, variants: list[str],
           sections: list[Section], results: report.Results) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = cpu_model()
    machine = [("cores", f"{os.cpu_count()} x {model}"),
               ("kernel (uname -r)", platform.release()),
               ("python", platform.python_version()),
               ("uvloop / msgpack / aiohttp", " / ".join(
                   importlib.metadata.version(p) for p in ("uvloop", "msgpack", "aiohttp"))),
               ("consulate", importlib.metadata.version("consulate"))]
    conditions = [
        ("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")),
        ("command", " ".join(["python -m bench.duplex", *sys.argv[1:]])),
        ("repetitions", f"{args.reps}; variants take turns within each repetition and "
                        "transport, in an order rotated by one per repetition, each server "
                        "started fresh"),
        ("duration", f"{args.duration:g} s per measurement, after the connection is up"),
        ("pinning", f"server on CPU {min(SERVER_CPUS)}, client on CPU {min(CLIENT_CPUS)} "
                    "(taskset)" if pin else "not applied (--no-pin, or CPUs 0 and 1 are "
                                            "not both usable)"),
        ("unary payload", f"{json.dumps(PAYLOAD)} ({len(msgpack.packb(PAYLOAD))} B as "
                          f"msgpack, {len(json.dumps(PAYLOAD))} B as JSON), echoed and checked"),
        ("CPU", "user+system time of the server process (/proc) and the client process "
                "over the measured window / wall time; 100 % = one core"),
        ("target (issue 8)", _target(results)),
        ("total runtime", f"{elapsed / 60:.1f} min"),
    ]
    preamble = [("Machine", machine), ("Conditions", conditions),
                ("Variants", list(VARIANTS.items()))]
    text = report.markdown("Duplex benchmark: duplex RPC vs aiohttp JSON vs raw msgpack",
                           preamble, sections, results, variants, args.reps)
    (out / "duplex.md").write_text(text)
    for section in sections:
        report.chart(section, results[section.key], variants, out / section.chart)
    raw = report.results_json(results)
    (out / "duplex.json").write_text(json.dumps(raw, indent=1) + "\n")


def _target(results: report.Results) -> str:
    """Issue 8 asks >= 20,000 unary calls/s on one core over unix: the measured rate
    (server pinned to one core), and the rate its CPU cost per call allows."""
    cell = results.get("unary-32-unix", {}).get("consulate-duplex")
    rate = cell.median(CALLS.key) if cell else None
    cost = cell.median(SERVER_US_PER_CALL.key) if cell else None
    if rate is None or cost is None:
        return ">= 20,000 unary calls/s on one core over unix: not measured"
    verdict = "met" if rate >= 20_000 else "NOT met"
    return (f">= 20,000 unary calls/s on one core over unix: {verdict}: median {rate:,.0f} "
            f"calls/s with 32 in flight, the server pinned to one core; its CPU cost of "
            f"{cost:.1f} µs per call is {1e6 / cost:,.0f} calls/s for a whole core")


if __name__ == "__main__":
    sys.exit(run_main(main))
