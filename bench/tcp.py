"""TCP benchmark: consulate's transparent proxy against the direct path, HAProxy and socat.

One lab (host h1, server container c1, client container c2), one run, every
variant measured under the same conditions: the variants take turns within each
repetition (in a rotated order, so that drift of a shared machine spreads over
all of them), each started fresh per repetition. Results go to ``tcp.md``, one
PNG per test and the raw samples in ``tcp.json``.

    python -m bench.tcp [--variants direct,haproxy,...] [--reps 3] [--duration 5]

Exits 1 when the direct path does not work: every other number is relative to it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python bench/tcp.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, peers, report, tcp_targets
from bench.dns import cpu_busy
from bench.machine import cpu_model
from bench.report import Metric, Section
from bench.signals import run_main
from consulate.control import lab as labs

PROXY_CPUS = {0}  # proxy-side processes in h1
LOADGEN_CPUS = {1}  # iperf3 / wrk clients in c2
RESULTS = Path(__file__).resolve().parent / "results"

GBPS = Metric("gbps", "throughput", "Gbit/s", True, 2)
CONNS = Metric("rps", "connections", "conn/s", True, 0)
RPS = Metric("rps", "requests", "req/s", True, 0)
P50 = Metric("p50_us", "p50 latency", "µs", False, 0)
P99 = Metric("p99_us", "p99 latency", "µs", False, 0)
CPU = Metric("cpu_pct", "proxy CPU", "% of a core", False, 0)
CPU_PER_GBIT = Metric("cpu_per_gbps", "proxy CPU per Gbit/s", "% of a core", False, 1)
MACHINE_CPU_PER_GBIT = Metric("machine_cpu_per_gbps", "machine CPU per Gbit/s", "% of a core",
                              False, 1)
CLIENT_TW = Metric("client_tw", "TIME_WAIT left in the client", "per connection", False, 2)


class DirectPathError(RuntimeError):
    """c2 cannot reach c1 without a proxy: the lab, not a proxy, is broken."""


@dataclass(frozen=True)
class Session:
    lab: labs.Lab
    duration: float
    pin: bool

    def loadgen_cpus(self, pinned: bool) -> set[int] | None:
        return LOADGEN_CPUS if self.pin and pinned else None


@dataclass(frozen=True)
class Test:
    section: Section
    pinned: bool  # False: proxy and client may use every core (latency)
    run: Callable[[Session, peers.Running], dict[str, float]]


def _url(running: peers.Running, backend: peers.Backend) -> str:
    address, port = running.targets[backend.key]
    return f"http://{address}:{port}/"


def _bulk(streams: int) -> Callable[[Session, peers.Running], dict[str, float]]:
    every_cpu = set(range(os.cpu_count() or 1))

    def run(session: Session, running: peers.Running) -> dict[str, float]:
        busy, cpu, started = cpu_busy(every_cpu), running.cpu_seconds(), time.monotonic()
        gbps = loadgen.iperf3(session.lab, running.targets[peers.IPERF.key], streams,
                              session.duration, session.loadgen_cpus(True))
        wall, cpu = time.monotonic() - started, running.cpu_seconds() - cpu
        busy = cpu_busy(every_cpu) - busy
        sample = {GBPS.key: gbps, MACHINE_CPU_PER_GBIT.key: 100 * busy / wall / gbps}
        if running.groups:  # direct has no proxy process to account
            sample[CPU.key] = 100 * cpu / wall
            sample[CPU_PER_GBIT.key] = sample[CPU.key] / gbps
        return sample
    return run


def _connrate(session: Session, running: peers.Running) -> dict[str, float]:
    """Also counts the TIME_WAIT sockets c2 is left with: a client that closes first
    keeps one per connection for 60 s, which is what runs its ports out."""
    time_wait = loadgen.time_wait_total(session.lab, peers.CLIENT)
    result = loadgen.wrk(session.lab, _url(running, peers.HTTP_CLOSE), 32, session.duration,
                         session.loadgen_cpus(True), close=True)
    time_wait = loadgen.time_wait_total(session.lab, peers.CLIENT) - time_wait
    return {CONNS.key: result.requests_per_second, CLIENT_TW.key: time_wait / result.requests}


def _rps32(session: Session, running: peers.Running) -> dict[str, float]:
    result = loadgen.wrk(session.lab, _url(running, peers.HTTP_KEEPALIVE), 32,
                         session.duration, session.loadgen_cpus(True))
    return {"rps": result.requests_per_second}


def _latency1(session: Session, running: peers.Running) -> dict[str, float]:
    result = loadgen.wrk(session.lab, _url(running, peers.HTTP_KEEPALIVE), 1, session.duration,
                         session.loadgen_cpus(False), latency=True)
    return {"p50_us": result.latency_us["50"], "p99_us": result.latency_us["99"],
            "rps": result.requests_per_second}


# In report order; they run pinned ones first, then the unpinned latency test.
TESTS = (
    Test(Section("bulk-1", "Bulk throughput, 1 stream (iperf3 -P 1)", (GBPS,),
                 "tcp-bulk-1.png", (CPU, CPU_PER_GBIT, MACHINE_CPU_PER_GBIT)), True, _bulk(1)),
    Test(Section("bulk-8", "Bulk throughput, 8 streams (iperf3 -P 8)", (GBPS,),
                 "tcp-bulk-8.png", (CPU, CPU_PER_GBIT, MACHINE_CPU_PER_GBIT)), True, _bulk(8)),
    Test(Section("connrate", "Connection rate (wrk -t1 -c32, Connection: close)", (CONNS,),
                 "tcp-connrate.png", (CLIENT_TW,)), True, _connrate),
    Test(Section("latency-1", "Small-message latency, 1 keep-alive connection "
                 "(wrk -t1 -c1 --latency, unpinned)", (P50, P99), "tcp-latency.png",
                 added=True), False, _latency1),
    Test(Section("rps-32", "Request rate, 32 keep-alive connections (wrk -t1 -c32)", (RPS,),
                 "tcp-rps-32.png"), True, _rps32),
)
RUN_ORDER = sorted(TESTS, key=lambda test: not test.pinned)


def _short(exc: BaseException, limit: int = 300) -> str:
    """First and last line of an error (an agent's error carries its whole log)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if len(lines) > 1:
        text += " … " + lines[-1]
    return text[:limit]


def _start(env: peers.Env, name: str) -> peers.Running:
    """Start a variant and prove it forwards; a variant that does not is stopped."""
    running = peers.VARIANTS[name][1](env)
    try:
        peers.check_forwards(env.lab, running)
    except BaseException:
        running.stop()
        raise
    return running


def _prepare(lab: labs.Lab) -> None:
    """Make the conditions every variant shares explicit rather than history-dependent.

    - Conntrack on in h1 for every variant, as on any Docker host (Docker's own
      MASQUERADE rule turns it on) and as the agent's UDP rules do: a MASQUERADE
      rule for a source that never occurs (TEST-NET-1). A nat rule without a
      conntrack target or match does not do it: with iptables-nft the nat hooks
      then run but no packet is tracked, so the proxies other than consulate,
      and the direct path, would be measured without conntrack's per-packet work.
    - tcp_tw_reuse in c2: a client that closes first keeps a TIME_WAIT socket per
      connection; once they cover its ephemeral ports, each connect() scans them
      all and the load generator, not the proxy, sets the connection rate.
    """
    lab.exec(peers.HOST, ["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24",
                          "-j", "MASQUERADE"], check=True)
    lab.exec(peers.CLIENT, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"], check=True)


def _check_direct(session: Session, work: Path) -> None:
    env = peers.Env(session.lab, work, None)
    try:
        running = _start(env, "direct")
        loadgen.iperf3(session.lab, running.targets[peers.IPERF.key], 1, 1, None)
    except (peers.PeerError, loadgen.LoadError, subprocess.SubprocessError) as exc:
        raise DirectPathError(f"the direct path c2 -> c1 does not work: {_short(exc)}") from exc


def _measure_variant(session: Session, name: str, rep: int, work: Path,
                     results: report.Results, notes: dict[str, set[str]]) -> None:
    """Start one variant, run every test on it once, stop it."""
    env = peers.Env(session.lab, work / f"{name}-{rep + 1}",
                    PROXY_CPUS if session.pin else None)
    env.work.mkdir()
    try:
        running = _start(env, name)
    except Exception as exc:  # any reason at all is a row in the table, not a crash
        reason = f"failed to start: {_short(exc)}"
        print(f"  {name:<17} {reason}", flush=True)
        for cells in results.values():
            cells[name].errors.append(reason)
        return
    try:
        if running.note:
            notes[name].add(running.note)
        for test in RUN_ORDER:
            if session.pin and not test.pinned:
                running.set_cpus(os.sched_getaffinity(0))
            cell = results[test.section.key][name]
            try:
                running.check_alive()
                sample = test.run(session, running)
            except (loadgen.LoadError, peers.PeerError, subprocess.SubprocessError) as exc:
                cell.errors.append(f"rep {rep + 1}: {_short(exc)}")
                print(f"  {name:<17} {test.section.key:<10} FAILED: {_short(exc)}", flush=True)
                continue
            cell.samples.append(sample)
            shown = "  ".join(f"{m.key}={m.fmt(sample[m.key])}"
                              for m in test.section.metrics + test.section.extras
                              if m.key in sample)
            print(f"  {name:<17} {test.section.key:<10} {shown}", flush=True)
    finally:
        running.stop()


def _version(argv: Sequence[str], line: int = 0) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({exc})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[line].strip() if len(lines) > line else "unknown"


def _machine() -> list[tuple[str, str]]:
    model = cpu_model()
    return [
        ("cores", f"{os.cpu_count()} x {model}"),
        ("kernel (uname -r)", platform.release()),
        ("haproxy", _version(["haproxy", "-v"])),
        ("iperf3", _version(["iperf3", "--version"])),
        ("wrk", _version(["wrk", "-v"])),
        ("nginx", _version(["nginx", "-v"])),
        ("socat", _version(["socat", "-V"], 1)),
        ("python", platform.python_version()),
        ("consulate", importlib.metadata.version("consulate")),
    ]


def _conditions(args: argparse.Namespace, pin: bool, elapsed: float) -> list[tuple[str, str]]:
    pinning = (f"applied: proxy-side processes in h1 on CPU {min(PROXY_CPUS)} (haproxy and "
               f"socat started under taskset, the agent's threads moved after start), load "
               f"generator in c2 on CPU {min(LOADGEN_CPUS)}, servers in c1 unpinned; the "
               "latency test runs unpinned (pinning would measure the VM's cross-core hop)"
               if pin else "not applied (--no-pin, or CPUs 0 and 1 are not both usable)")
    return [
        ("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")),
        ("command", " ".join(["python -m bench.tcp", *sys.argv[1:]])),
        ("repetitions", f"{args.reps}; variants take turns within each repetition, in an "
                        "order rotated by one per repetition, each started fresh"),
        ("duration", f"{args.duration:g} s per iperf3 / wrk run"),
        ("pinning", pinning),
        ("conntrack", "on in h1 from the start for every variant, direct included, as on "
                      "any Docker host: a MASQUERADE rule for a source that never occurs "
                      "(192.0.2.0/24), like Docker's for docker0 (a nat rule without a "
                      "conntrack target or match would leave conntrack off with iptables-nft)"),
        ("client sysctl", "net.ipv4.tcp_tw_reuse=1 in c2 (the default 2 reuses TIME_WAIT "
                          "ports on loopback only): without it a proxy that lets the client "
                          "close first runs c2's ephemeral ports out within ~2 s and the "
                          "connection rate measures wrk's connect() port search"),
        ("haproxy", "nbthread left at its default (= CPUs in its affinity at start), maxconn "
                    "and buffers default unless the variant says otherwise; no logging"),
        ("nginx (c1)", f"1 worker, access log off, :{peers.HTTP_CLOSE.port} keepalive_timeout "
                       f"0 (connection rate), :{peers.HTTP_KEEPALIVE.port} keep-alive "
                       "(latency, req/s); answers `ok\\n`"),
        ("iperf3 (c1)", f"`iperf3 -s -p {peers.IPERF.port}`; Gbit/s = "
                        "end.sum_received.bits_per_second"),
        ("proxy CPU", "user+system time of the proxy's process group (socat's forked "
                      "children included) over the iperf3 run / wall time; 100 % = one core"),
        ("machine CPU", "busy time of every CPU (/proc/stat: user, nice, system, irq, "
                        "softirq, steal) over the iperf3 run / wall time, per Gbit/s: "
                        "everything the transfer cost the machine (iperf3 at both ends, the "
                        "kernel's TCP/IP and softirq work wherever it ran, the proxy), "
                        "direct included; meaningful because nothing else runs during the "
                        "benchmark"),
        ("total runtime", f"{elapsed / 60:.1f} min"),
    ]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tcp",
        description="Measure consulate's TCP proxy against the direct path, HAProxy and "
                    "socat in a lab of network namespaces (needs root).")
    parser.add_argument("--variants", default=",".join(peers.VARIANTS),
                        help=f"comma-separated, from: {', '.join(peers.VARIANTS)} "
                             "(default: all; direct is always measured)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per test (default 3)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per iperf3 / wrk run (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"directory for tcp.md, charts and tcp.json (default {RESULTS})")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin proxy and load generator to separate cores")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in peers.VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: "
                     f"use any of {', '.join(peers.VARIANTS)}")
    # Every ratio is against direct, so it is measured whatever was asked.
    args.variants = ["direct", *dict.fromkeys(n for n in names if n != "direct")]
    if args.reps < 1 or args.duration <= 0:
        parser.error("--reps must be at least 1 and --duration above 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    variants: list[str] = args.variants
    pin = not args.no_pin and os.sched_getaffinity(0) >= PROXY_CPUS | LOADGEN_CPUS
    results: report.Results = {test.section.key: {name: report.Cell() for name in variants}
                               for test in TESTS}
    notes: dict[str, set[str]] = {name: set() for name in variants}
    work = Path(tempfile.mkdtemp(prefix="consulate-bench-"))
    started = time.monotonic()
    lab = labs.up(hosts=1, containers=2, name=f"{labs.LAB_PREFIX}bench-{os.urandom(3).hex()}")
    try:
        session = Session(lab, args.duration, pin)
        _prepare(lab)
        servers = peers.start_servers(lab, work)
        try:
            _check_direct(session, work)
            for rep in range(args.reps):
                print(f"repetition {rep + 1}/{args.reps}", flush=True)
                turn = rep % len(variants)
                for name in variants[turn:] + variants[:turn]:
                    _measure_variant(session, name, rep, work, results, notes)
        finally:
            for group in servers:
                group.stop()
    except DirectPathError as exc:
        print(f"bench.tcp: error: {exc} (logs kept in {work})", file=sys.stderr)
        return 1
    finally:
        lab.down()
    elapsed = time.monotonic() - started
    shutil.rmtree(work, ignore_errors=True)
    _write(args, pin, elapsed, variants, results, notes)
    broken = [f"{key}: {e}" for key, cells in results.items() for e in cells["direct"].errors]
    if broken:
        print("bench.tcp: error: the direct path failed during the run: " + "; ".join(broken),
              file=sys.stderr)
        return 1
    print(f"done in {elapsed / 60:.1f} min: {args.out / 'tcp.md'}")
    return 0


def _write(args: argparse.Namespace, pin: bool, elapsed: float, variants: list[str],
           results: report.Results, notes: dict[str, set[str]]) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sections = [test.section for test in TESTS]
    variant_rows = [(name, peers.VARIANTS[name][0] +
                     "".join(f"; {note}" for note in sorted(notes[name])))
                    for name in variants]
    preamble = [("Machine", _machine()), ("Conditions", _conditions(args, pin, elapsed)),
                ("Variants", variant_rows)]
    rows, bounds = tcp_targets.targets(results)
    text = report.markdown("TCP benchmark: consulate vs direct, HAProxy, socat",
                           [("Targets (issue 3, ratios of medians in this run)", rows),
                            *preamble], sections, results, variants, args.reps)
    if bounds:
        text += "\n## What bounds the missed targets\n\n" + "\n\n".join(bounds) + "\n"
    (out / "tcp.md").write_text(text)
    for section in sections:
        report.chart(section, results[section.key], variants, out / section.chart)
    raw = report.results_json(results)
    (out / "tcp.json").write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(run_main(main))
