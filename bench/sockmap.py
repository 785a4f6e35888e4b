"""Would BPF sockmap beat the native engine's splice relay? Measured side by side.

Loopback (127.0.0.1), one run: an iperf3 server, and in front of it either the
native engine (``SpliceEngine.add`` of each accepted connection and its upstream,
what the agent does) or bench/sockmap_probe.c (an SK_SKB verdict program that
redirects each socket's input to its peer's egress, so the bytes never reach a
relay thread; see that file). Variants take turns within each repetition
(rotated), each started fresh. Per run: Gbit/s, the machine's CPU per Gbit/s
(/proc/stat, every core: sockmap's forwarding runs in kworkers and softirq, which
no process's CPU time shows), and TCP segments retransmitted per GB moved
(/proc/net/snmp; loopback loses nothing, so these are spurious). The fixed-rate
test (-b 2G) compares the CPU per Gbit/s at a rate both reach.

    python -m bench.sockmap [--reps 3] [--duration 5]

Needs root (bpf(2)), a C compiler and iperf3. Writes results/sockmap.md, one PNG
per test and sockmap.json; bench/results/tcp.md cites it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.dns import cpu_busy
from bench.loadgen import parse_iperf3
from bench.report import Metric, Section
from bench.signals import run_main
from consulate.native.engine import SpliceEngine

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MiB = 1 << 20
VARIANTS = ("consulate-native", "sockmap")
GBPS = Metric("gbps", "throughput", "Gbit/s", True, 2)
MACHINE_CPU = Metric("machine_cpu_per_gbps", "machine CPU per Gbit/s", "% of a core", False, 1)
RETRANS = Metric("retrans_per_gb", "segments retransmitted per GB", "segments", False, 0)
BACKLOG = Metric("backlog_mib", "peak bytes held between the sockets", "MiB", False, 1)
# (section, iperf3 streams, iperf3 -b rate or "" for as fast as it goes)
EXTRAS = (MACHINE_CPU, RETRANS, BACKLOG)
VERSUS = ("consulate-native",)
TESTS = (
    (Section("bulk-1", "1 stream, as fast as it goes (iperf3 -P 1)", (GBPS,),
             "sockmap-bulk-1.png", EXTRAS, versus=VERSUS), 1, ""),
    (Section("bulk-8", "8 streams, as fast as they go (iperf3 -P 8)", (GBPS,),
             "sockmap-bulk-8.png", EXTRAS, versus=VERSUS), 8, ""),
    (Section("fixed", "1 stream at 2 Gbit/s (iperf3 -P 1 -b 2G): CPU at the same rate",
             (MACHINE_CPU,), "sockmap-fixed.png", (GBPS, RETRANS, BACKLOG), versus=VERSUS),
     1, "2G"),
)


class ProbeUnavailable(RuntimeError):
    """The kernel refused the BPF map or program (or no C compiler): say so, exit 1."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _retransmitted() -> int:
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")])


@contextlib.contextmanager
def _process(argv: Sequence[str], ready: str | None = None) -> Iterator[subprocess.Popen[str]]:
    """A child in its own session; waits for the line ``ready``; stopped by its pid."""
    child = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        if ready is not None:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != ready:
                output = line + child.stdout.read() if child.poll() is not None else line
                raise ProbeUnavailable(f"{argv[0]} did not start (exit {child.poll()}): "
                                       f"{output.strip()[:400]}")
        yield child
    finally:
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@contextlib.contextmanager
def _engine_relay(listen_port: int, upstream_port: int) -> Iterator[None]:
    """The native engine relaying each accepted connection to the upstream port."""
    engine = SpliceEngine()
    listener = socket.create_server(("127.0.0.1", listen_port))
    stop = threading.Event()

    def accept() -> None:
        for conn_id in itertools.count():
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed: stop
            try:
                upstream = socket.create_connection(("127.0.0.1", upstream_port))
            except OSError as exc:  # iperf3 then fails, and says so
                print(f"consulate-native: cannot reach iperf3 -s: {exc}", file=sys.stderr)
                client.close()
                continue
            client.setblocking(False)
            upstream.setblocking(False)
            try:
                engine.add(conn_id, client, upstream)
            except OSError as exc:
                print(f"consulate-native: declined a connection: {exc}", file=sys.stderr)
                client.close()
                upstream.close()
            if stop.is_set():
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
        engine.close()


def _iperf3(port: int, streams: int, rate: str, duration: float) -> dict[str, float]:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P", str(streams),
            "-t", f"{duration:g}", "-J", *(["-b", rate] if rate else [])]
    every_cpu = set(range(os.cpu_count() or 1))
    busy, retrans, started = cpu_busy(every_cpu), _retransmitted(), time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    wall, busy = time.monotonic() - started, cpu_busy(every_cpu) - busy
    gbps = parse_iperf3(done.stdout) / 1e9
    moved_gb = gbps * wall / 8
    return {GBPS.key: gbps, MACHINE_CPU.key: 100 * busy / wall / gbps,
            RETRANS.key: (_retransmitted() - retrans) / moved_gb}


def _collect_backlogs(child: subprocess.Popen[str] | None) -> list[int]:
    """The probe's ``backlog PEAK`` lines, appended as they come (by a thread)."""
    peaks: list[int] = []
    if child is None or child.stdout is None:
        return peaks
    stream = child.stdout

    def read() -> None:
        for line in stream:
            word, _, value = line.partition(" ")
            if word == "backlog":
                peaks.append(int(value))

    threading.Thread(target=read, daemon=True).start()
    return peaks


def _build(work: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ProbeUnavailable("no C compiler (cc) to build bench/sockmap_probe.c")
    binary = work / "sockmap_probe"
    subprocess.run([compiler, "-O2", "-Wall", "-Wextra", "-o", str(binary),
                    str(HERE / "sockmap_probe.c"), "-lpthread"], check=True)
    return binary


def measure(reps: int, duration: float, work: Path) -> report.Results:
    probe = _build(work)
    server_port = _free_port()
    results: report.Results = {section.key: {name: report.Cell() for name in VARIANTS}
                               for section, _, _ in TESTS}
    with _process(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(server_port)]):
        time.sleep(0.5)  # iperf3 -s prints nothing useful to wait for; it binds at once
        for rep in range(reps):
            order = VARIANTS[rep % 2:] + VARIANTS[:rep % 2]
            for name in order:
                port = _free_port()
                relay = (_engine_relay(port, server_port) if name == "consulate-native" else
                         _process([str(probe), str(port), str(server_port)], ready="ready"))
                with relay as child:
                    peaks = _collect_backlogs(child)
                    for section, streams, rate in TESTS:
                        sample = _iperf3(port, streams, rate, duration)
                        if child is not None:  # the probe reports as connections end
                            time.sleep(0.5)
                            sample[BACKLOG.key] = max(peaks, default=0) / MiB
                            peaks.clear()
                        results[section.key][name].samples.append(sample)
                        print(f"rep {rep + 1} {name:<14} {section.key:<7} " + "  ".join(
                            f"{k}={v:.2f}" for k, v in sample.items()), flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sockmap", description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="consulate-sockmap-") as work:
        try:
            results = measure(args.reps, args.duration, Path(work))
        except ProbeUnavailable as exc:
            print(f"bench.sockmap: error: {exc}", file=sys.stderr)
            return 1
    conditions = [
        ("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")),
        ("command", " ".join(["python -m bench.sockmap", *(argv or sys.argv[1:])])),
        ("machine", f"{os.cpu_count()} cores, kernel {platform.release()}"),
        ("path", "iperf3 client -> relay on 127.0.0.1 -> iperf3 server on 127.0.0.1, "
                 "nothing pinned, no netfilter rules"),
        ("consulate-native", "consulate.native.engine.SpliceEngine (adaptive: copy, then "
                          "splice(2) through 1 MiB pipes), one epoll thread; it holds at most "
                          "one pipe per direction between the sockets (not measured: —)"),
        ("sockmap", "bench/sockmap_probe.c: SOCKHASH keyed by socket cookie, SK_SKB stream "
                    "verdict bpf_sk_redirect_hash to the peer's egress, no stream parser"),
        ("repetitions", f"{args.reps}, variants alternating, {args.duration:g} s per run"),
        ("total runtime", f"{(time.monotonic() - started) / 60:.1f} min"),
    ]
    sections = [section for section, _, _ in TESTS]
    args.out.mkdir(parents=True, exist_ok=True)
    text = report.markdown("BPF sockmap against the native splice engine",
                           [("Conditions", conditions)], sections, results, VARIANTS,
                           args.reps)
    (args.out / "sockmap.md").write_text(text)
    for section in sections:
        report.chart(section, results[section.key], VARIANTS, args.out / section.chart)
    (args.out / "sockmap.json").write_text(
        json.dumps(report.results_json(results), indent=1) + "\n")
    print(f"done: {args.out / 'sockmap.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
