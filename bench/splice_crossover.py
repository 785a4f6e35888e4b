"""Where does splice(2) start to beat recv/send? The native relay engine, three mode policies.

One process, real loopback TCP (127.0.0.1): client <-> engine <-> server, the two
ends being Python threads with blocking sockets, the relay a ``SpliceEngine``
created fresh per run with ``mode`` = copy (never splice), splice (from the first
read on) or adaptive (the default: copy, upgrade on a full 16 KiB recv, drop back
below ``splice_threshold``). For each message size:

* stream: the client sends messages of that size back to back for ~1 s, then
  shuts down; MB/s = bytes the server received / time to its EOF;
* rr: the client sends one message, the server echoes it, repeat for ~1 s;
  round trips per second.

Each run also reads the engine thread's CPU time (/proc/self/task/TID/stat) and
the share of bytes the engine moved by splice (its result counters). Modes take
turns within each repetition (rotated), 3 repetitions, nothing pinned. Writes
``results/splice-crossover.md`` and ``results/splice-crossover.png``.

    python -m bench.splice_crossover [--reps 3] [--duration 1.0]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import select
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `consulate` importable the same way
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_model
from bench.signals import run_main
from consulate.native.engine import DEFAULT_SPLICE_THRESHOLD, SpliceEngine

KiB = 1024
SIZES = [256, KiB, 4 * KiB, 8 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1024 * KiB]
MODES = ["copy", "splice", "adaptive"]
RESULTS = Path(__file__).resolve().parent / "results"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    value: float  # MB/s (stream) or round trips/s (rr)
    cpu_s: float  # engine thread user+system seconds
    work: float  # MB moved (stream) or round trips (rr), to normalise cpu_s
    spliced: float  # fraction of the relayed bytes moved by splice(2)


def _tids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _cpu_seconds(tid: int) -> float:
    text = Path(f"/proc/self/task/{tid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


class Relay:
    """A fresh engine (and its thread id) with one relayed client/server pair."""

    def __init__(self, mode: str) -> None:
        before = _tids()
        self.engine = SpliceEngine(mode=mode)
        [self.tid] = _tids() - before  # the engine's epoll thread
        front = socket.create_server(("127.0.0.1", 0))
        back = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(front.getsockname())
        a, _ = front.accept()
        b = socket.create_connection(back.getsockname())
        self.server, _ = back.accept()
        front.close()
        back.close()
        # Nagle off everywhere, as in production: with it on, echoes of >= 64 KiB
        # wait ~40 ms for delayed ACKs and the table would measure that, not the relay.
        for sock in (self.client, a, b, self.server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a.setblocking(False)
        b.setblocking(False)
        self.engine.add(1, a, b)
        self.cpu0 = _cpu_seconds(self.tid)

    def finish(self) -> tuple[float, float]:
        """Close both ends; (engine CPU seconds, spliced fraction) once it reported."""
        cpu = _cpu_seconds(self.tid) - self.cpu0
        self.client.close()
        self.server.close()
        results = []
        deadline = time.monotonic() + 5
        while not results and time.monotonic() < deadline:
            select.select([self.engine.notify_fd], [], [], 0.1)
            results = self.engine.poll()
        results += self.engine.close()
        moved = sum(r.bytes_a_to_b + r.bytes_b_to_a for r in results)
        spliced = sum(r.spliced_a_to_b + r.spliced_b_to_a for r in results)
        return cpu, spliced / moved if moved else 0.0


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("EOF in the middle of a message")
        got += n


def stream(mode: str, size: int, duration: float) -> Run:
    relay = Relay(mode)
    message = b"x" * size
    received = 0

    def receive() -> None:
        nonlocal received
        buf = bytearray(1 << 20)
        while n := relay.server.recv_into(buf):
            received += n

    receiver = threading.Thread(target=receive)
    receiver.start()
    start = time.perf_counter()
    deadline = start + duration
    while time.perf_counter() < deadline:
        for _ in range(max(1, (64 * KiB) // size)):  # check the clock about every 64 KiB
            relay.client.sendall(message)
    relay.client.shutdown(socket.SHUT_WR)
    receiver.join()
    elapsed = time.perf_counter() - start
    cpu, spliced = relay.finish()
    return Run(received / elapsed / 1e6, cpu, received / 1e6, spliced)


def rr(mode: str, size: int, duration: float) -> Run:
    relay = Relay(mode)
    message = b"x" * size

    def echo() -> None:
        buf = memoryview(bytearray(size))
        try:
            while True:
                recv_exactly(relay.server, buf)
                relay.server.sendall(buf)
        except ConnectionError:  # the client's EOF: done
            pass

    server = threading.Thread(target=echo)
    server.start()
    answer = memoryview(bytearray(size))
    trips = 0
    start = time.perf_counter()
    deadline = start + duration
    while time.perf_counter() < deadline:
        relay.client.sendall(message)
        recv_exactly(relay.client, answer)
        trips += 1
    elapsed = time.perf_counter() - start
    relay.client.shutdown(socket.SHUT_WR)
    server.join()
    cpu, spliced = relay.finish()
    return Run(trips / elapsed, cpu, trips, spliced)


def size_label(size: int) -> str:
    if size >= 1024 * KiB:
        return f"{size // (1024 * KiB)} MiB"
    return f"{size // KiB} KiB" if size >= KiB else f"{size} B"


def mmm(values: list[float], digits: int) -> str:
    """min / **median** / max."""
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{lo:,.{digits}f} / **{mid:,.{digits}f}** / {hi:,.{digits}f}"


def table(test: str, runs: dict[tuple[str, str, int], list[Run]], unit: str,
          cpu_unit: str, cpu_scale: float) -> list[str]:
    lines = [f"| size | mode | {unit} (min / **median** / max) | vs copy (medians) "
             f"| engine CPU, {cpu_unit} (median) | engine CPU, % of a core (median) "
             f"| spliced (median) |",
             "|---|---|---|---|---|---|---|"]
    for size in SIZES:
        copy = statistics.median(r.value for r in runs[test, "copy", size])
        for mode in MODES:
            cell = runs[test, mode, size]
            med = statistics.median(r.value for r in cell)
            per = statistics.median(r.cpu_s / r.work * cpu_scale for r in cell if r.work)
            busy = statistics.median(r.cpu_s for r in cell) / DURATION * 100
            spliced = statistics.median(r.spliced for r in cell) * 100
            lines.append(f"| {size_label(size)} | {mode} | {mmm([r.value for r in cell], 0)} "
                         f"| {med / copy:.2f} | {per:,.1f} | {busy:.0f} | {spliced:.0f} % |")
    return lines


def chart(runs: dict[tuple[str, str, int], list[Run]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, test, ylabel in ((axes[0], "stream", "MB/s at the receiver"),
                             (axes[1], "rr", "round trips / s")):
        for mode in MODES:
            meds = [statistics.median(r.value for r in runs[test, mode, s]) for s in SIZES]
            los = [min(r.value for r in runs[test, mode, s]) for s in SIZES]
            his = [max(r.value for r in runs[test, mode, s]) for s in SIZES]
            ax.plot(SIZES, meds, marker="o", label=mode)
            ax.fill_between(SIZES, los, his, alpha=0.15)
        ax.set_xscale("log", base=2)
        if test == "rr":
            ax.set_yscale("log")
        ax.set_xticks(SIZES, [size_label(s) for s in SIZES], rotation=30)
        ax.axvline(DEFAULT_SPLICE_THRESHOLD, color="grey", ls=":", lw=1)
        ax.axvline(16 * KiB, color="grey", ls="--", lw=1)
        ax.set_xlabel("message size (dotted: threshold 4 KiB, dashed: 16 KiB upgrade)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{test}: median of {REPS} (band: min-max)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("native relay engine over loopback TCP: copy vs splice vs adaptive")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> list[str]:
    model = cpu_model()
    return ["| | |", "|---|---|",
            f"| cores | {os.cpu_count()} x {model} |",
            f"| kernel (uname -r) | {platform.release()} |",
            f"| python | {platform.python_version()} |",
            f"| pipe-max-size | {Path('/proc/sys/fs/pipe-max-size').read_text().strip()} |"]


DURATION = 1.0
REPS = 3


def main() -> int:
    global DURATION, REPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=REPS)
    parser.add_argument("--duration", type=float, default=DURATION)
    args = parser.parse_args()
    DURATION, REPS = args.duration, args.reps
    runs: dict[tuple[str, str, int], list[Run]] = {}
    began = time.monotonic()
    for rep in range(REPS):
        for size in SIZES:
            order = MODES[rep % 3:] + MODES[:rep % 3]  # rotate: spread the drift
            for mode in order:
                for test, fn in (("stream", stream), ("rr", rr)):
                    run = fn(mode, size, DURATION)
                    runs.setdefault((test, mode, size), []).append(run)
                    print(f"rep {rep + 1} {test:6} {size_label(size):>7} {mode:8} "
                          f"{run.value:12,.0f}  cpu {run.cpu_s:.2f}s  "
                          f"spliced {run.spliced:.0%}", flush=True)
    minutes = (time.monotonic() - began) / 60
    RESULTS.mkdir(exist_ok=True)
    chart(runs, RESULTS / "splice-crossover.png")
    md = [
        "# Splice crossover: the native relay engine's copy vs splice vs adaptive",
        "",
        "## Machine", "", *machine(), "",
        "## Conditions", "",
        "| | |", "|---|---|",
        f"| date (UTC) | {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} |",
        "| command | python -m bench.splice_crossover |",
        f"| repetitions | {REPS}; modes take turns within each repetition, rotated by one "
        "per repetition; a fresh engine and connection per run |",
        f"| duration | {DURATION:g} s per run; total {minutes:.1f} min |",
        "| path | one process: client thread -> 127.0.0.1 -> engine thread (C, epoll) -> "
        "127.0.0.1 -> server thread; blocking sockets at the ends; TCP_NODELAY on all four "
        "sockets, as the agent sets it |",
        "| engine | `SpliceEngine(mode=...)`, defaults otherwise: 1 MiB pipes, "
        f"splice_threshold {DEFAULT_SPLICE_THRESHOLD}, 16 KiB copy buffer |",
        "| pinning | none: client, server and engine threads share the cores |",
        "| engine CPU | user+system of the engine thread (/proc/self/task/TID/stat, "
        f"{1000 // TICK} ms ticks) over the run |",
        "| spliced | share of the relayed bytes moved by splice(2) (engine's counters) |",
        "",
        "## stream: one-way throughput", "",
        "The client writes messages of the given size back to back; MB/s (10^6 B/s) "
        "received by the server.", "",
        *table("stream", runs, "MB/s", "ms per GB", 1000 * 1000),
        "",
        "## rr: request/response", "",
        "The client sends a message, the server echoes it back; round trips per second.",
        "",
        *table("rr", runs, "round trips/s", "µs per round trip", 1e6),
        "",
        "![throughput and round trips vs message size](splice-crossover.png)",
        "",
        "## Conclusion", "",
        "_(written by hand from the tables after the run; a re-run resets it)_",
        "",
    ]
    (RESULTS / "splice-crossover.md").write_text("\n".join(md))
    print(f"wrote {RESULTS / 'splice-crossover.md'} and .png in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
