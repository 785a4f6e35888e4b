"""DNS benchmark: consulate's responder against dnsmasq and unbound, same records, same run.

One service set (1,000 services, 1-3 instances each) is registered into a real
``consulate agent``; dnsmasq and unbound are configured from the same set and the
VIPs the agent allocated (bench/dns_peers.py), and every server is checked
against the set before it is measured. All servers listen on 127.0.0.0/8, each
pinned to one core (CPU 1); the load generators run on the other (CPU 0).

Per query mix and repetition, the servers take turns (in an order rotated by one
per repetition) at:

- throughput: dnsperf for ``--duration`` seconds, as fast as the server answers
  with ``--outstanding`` queries in flight;
- latency at fixed rates (``--rates``, 20,000 q/s by default): the open-loop
  prober bench/dns_probe.py, client-side round trips, p50/p99/p99.9/max;

then, on consulate alone: freshness (a registry change through the HTTP API
until the DNS answer shows it, ``--events`` times each way) and a py-spy profile
under dnsperf load, to say what bounds it. Results go to ``dns.md``, PNGs and the
raw samples in ``dns.json``.

    python -m bench.dns [--reps 3] [--duration 10] [--rates 20000] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import importlib.metadata
import json
import linecache
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python bench/dns.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib.pyplot as plt
from dnslib import DNSRecord

from bench import dns_peers, report, signals
from bench.dns_peers import Agent, Server, Service
from bench.machine import cpu_model
from bench.peers import PeerError, taskset
from bench.report import Metric, Section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SERVER_CPUS = {1}  # every DNS server, all of its threads
CLIENT_CPUS = {0}  # dnsperf, the prober, the freshness poller, py-spy
SLACK = 30.0  # seconds a load generator may take beyond its duration
MAX_FAILED_SHARE = 0.01  # lost or non-NOERROR answers above this: the run says nothing
SERVERS = ("consulate", "dnsmasq", "unbound", "dnsmasq-a-only")
A_ONLY = "dnsmasq-a-only"  # serves the A records alone: the cost of dnsmasq's SRV list

QPS = Metric("qps", "queries", "q/s", True, 0)
SERVER_CPU = Metric("server_cpu_pct", "server CPU", "% of a core", False, 0)
CPU_PER_QUERY = Metric("cpu_us_per_query", "server CPU per query", "µs", False, 1)
# 1 s / CPU per query: what one whole core would answer at this cost per query. Less
# sensitive than q/s to other load on a shared machine (which takes wall time, not
# the server's CPU time); a server that batches more when saturated does better.
USER_PER_QUERY = Metric("user_us_per_query", "of which user space", "µs", False, 1)
CAPACITY = Metric("capacity_qps", "one-core capacity (1 s / CPU per query)", "q/s", True, 0)
CLIENT_CPU = Metric("client_cpu_pct", "dnsperf CPU", "% of a core", False, 0)
MEAN_LATENCY = Metric("mean_latency_ms", "dnsperf mean latency", "ms", False, 2)
LOST = Metric("lost_pct", "lost", "%", False, 2)
OTHER = Metric("other_cpu_pct", "other load on the server's core", "% of it", False, 0)
P50 = Metric("p50", "p50 latency", "µs", False, 0)
P99 = Metric("p99", "p99 latency", "µs", False, 0)
P999 = Metric("p999", "p99.9 latency", "µs", False, 0)
MAX = Metric("max", "max latency", "µs", False, 0)
ACHIEVED = Metric("achieved_qps", "rate sent", "q/s", True, 0)
PERCENTILE_KEYS = (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9"),
                   ("max", "max"))

TARGET_VS_DNSMASQ = 1.3
TARGET_VS_UNBOUND = 1.0
TARGET_P99_US = 1000.0
TARGET_P99_AT = 20000.0
TARGET_FRESH_MS = 100.0


def slug(mix: str) -> str:
    return mix.replace("+", "-")


def qps_key(mix: str) -> str:
    return f"qps-{slug(mix)}"


def latency_key(mix: str, rate: float) -> str:
    return f"latency-{slug(mix)}-{rate:g}"


# -- dnsperf -----------------------------------------------------------------------------


class LoadError(RuntimeError):
    """A load generator failed, printed something unexpected, or saw failed queries."""


@dataclass(frozen=True)
class DnsperfResult:
    qps: float
    sent: int
    completed: int
    lost: int
    rcodes: dict[str, int]
    mean_latency_s: float
    response_bytes: float


def _field(pattern: str, text: str) -> str:
    found = re.search(pattern, text, re.M)
    if found is None:
        raise LoadError(f"dnsperf printed no {pattern!r}: {text[-300:]!r}")
    return found.group(1)


def parse_dnsperf(text: str) -> DnsperfResult:
    """The statistics block dnsperf 2.x prints at the end of a run."""
    codes = _field(r"^\s*Response codes:\s+(.*)$", text)
    rcodes = {name: int(count) for name, count in re.findall(r"([A-Z]+) (\d+) \(", codes)}
    return DnsperfResult(
        qps=float(_field(r"^\s*Queries per second:\s+([\d.]+)", text)),
        sent=int(_field(r"^\s*Queries sent:\s+(\d+)", text)),
        completed=int(_field(r"^\s*Queries completed:\s+(\d+)", text)),
        lost=int(_field(r"^\s*Queries lost:\s+(\d+)", text)),
        rcodes=rcodes,
        mean_latency_s=float(_field(r"^\s*Average Latency \(s\):\s+([\d.]+)", text)),
        response_bytes=float(_field(r"^\s*Average packet size:.*response (\d+)", text)),
    )


def cpu_busy(cpus: set[int]) -> float:
    """Seconds the kernel counts ``cpus`` as busy since boot (/proc/stat, steal included)."""
    ticks = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, *rest = map(int, values)
            ticks += user + nice + system + irq + softirq + (rest[0] if rest else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def user_seconds(server: Server) -> float:
    """User-space CPU time of the server's processes (the rest is the kernel's)."""
    return sum(int(fields[11]) for fields in server.group.members().values()) / os.sysconf(
        "SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def dnsperf(server: Server, queries: Path, duration: float, outstanding: int,
            cpus: set[int] | None, server_cpus: set[int] | None = None) -> dict[str, float]:
    """One dnsperf run (one client socket, one thread) as fast as the server answers;
    with ``server_cpus``, also how much of them went to anything but the server."""
    argv = [*taskset(cpus), "dnsperf", "-s", server.address, "-p", str(server.port),
            "-d", str(queries), "-l", f"{duration:g}", "-c", "1", "-T", "1",
            "-q", str(outstanding), "-t", "2"]
    server_cpu, client_cpu = server.group.cpu_seconds(), _children_cpu()
    user = user_seconds(server)
    busy = cpu_busy(server_cpus) if server_cpus else 0.0
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + SLACK)
    wall = time.monotonic() - started
    server_cpu, client_cpu = server.group.cpu_seconds() - server_cpu, _children_cpu() - client_cpu
    busy = cpu_busy(server_cpus) - busy if server_cpus else 0.0
    user = user_seconds(server) - user
    if done.returncode != 0:
        raise LoadError(f"dnsperf exited with {done.returncode}: "
                        f"{(done.stderr or done.stdout).strip()[-200:]}")
    result = parse_dnsperf(done.stdout)
    failed = result.lost + result.completed - result.rcodes.get("NOERROR", 0)
    if result.completed == 0 or failed > MAX_FAILED_SHARE * result.sent:
        raise LoadError(f"dnsperf: {result.lost} lost and rcodes {result.rcodes} "
                        f"in {result.sent} queries")
    return {QPS.key: result.qps, SERVER_CPU.key: 100 * server_cpu / wall,
            CPU_PER_QUERY.key: 1e6 * server_cpu / result.completed,
            USER_PER_QUERY.key: 1e6 * user / result.completed,
            CAPACITY.key: result.completed / server_cpu if server_cpu else 0.0,
            CLIENT_CPU.key: 100 * client_cpu / wall,
            MEAN_LATENCY.key: 1e3 * result.mean_latency_s,
            LOST.key: 100 * result.lost / result.sent, "response_bytes": result.response_bytes,
            **({OTHER.key: max(0.0, 100 * (busy - server_cpu) / wall / len(server_cpus))}
               if server_cpus else {})}


def probe(server: Server, queries: Path, rate: float, duration: float,
          cpus: set[int] | None, server_cpus: set[int] | None = None) -> dict[str, float]:
    """bench/dns_probe.py at a fixed rate: client-side round-trip percentiles (µs)."""
    argv = [*taskset(cpus), sys.executable, "-m", "bench.dns_probe",
            "--server", f"{server.address}:{server.port}", "--queries", str(queries),
            "--rate", f"{rate:g}", "--duration", f"{duration:g}"]
    server_cpu, busy = server.group.cpu_seconds(), cpu_busy(server_cpus or set())
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + SLACK,
                          cwd=ROOT)
    wall = time.monotonic() - started
    other = cpu_busy(server_cpus or set()) - busy - (server.group.cpu_seconds() - server_cpu)
    if done.returncode != 0:
        raise LoadError(f"dns_probe exited with {done.returncode}: {done.stderr.strip()[-200:]}")
    try:
        result: dict[str, float] = json.loads(done.stdout)
    except ValueError as exc:
        raise LoadError(f"dns_probe printed no JSON: {done.stdout[-200:]!r}") from exc
    if not result.get("answered"):
        raise LoadError(f"dns_probe: no answer to {result.get('sent', 0):.0f} queries")
    result[LOST.key] = 100 * result["lost"] / result["sent"]
    if server_cpus:
        result[OTHER.key] = max(0.0, 100 * other / wall / len(server_cpus))
    return result


# -- the run -------------------------------------------------------------------------------


@dataclass
class Plan:
    servers: list[str]
    mixes: list[str]
    rates: list[float]
    reps: int
    duration: float
    outstanding: int
    pin: bool

    @property
    def server_cpus(self) -> set[int]:
        return SERVER_CPUS if self.pin else os.sched_getaffinity(0)

    @property
    def client_cpus(self) -> set[int] | None:
        return CLIENT_CPUS if self.pin else None


@dataclass
class Run:
    """Everything one run measured, for the report and dns.json."""

    results: report.Results = field(default_factory=dict)
    checks: dict[str, dict[str, dns_peers.AnswerCheck]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    freshness: dict[str, list[float]] = field(default_factory=dict)  # event kind -> ms
    http_ms: list[float] = field(default_factory=list)  # the PUT alone, every event
    profile: list[tuple[str, float, float]] = field(default_factory=list)  # fn, incl, self %
    profile_lines: list[tuple[str, float, str]] = field(default_factory=list)  # line, %, code
    profile_note: str = ""
    registering_s: float = 0.0


def _short(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


def serves(name: str, mix: str) -> bool:
    return name != A_ONLY or mix == "a"


def start_servers(plan: Plan, work: Path, services: list[Service],
                  run: Run) -> tuple[dict[str, Server], Agent]:
    """consulate first (its VIPs feed the peers), then each peer on an address of its own
    (127.53.R.N: one random R per run) and a free port."""
    base = f"127.53.{random.randint(0, 255)}"
    servers: dict[str, Server] = {}
    consulate, agent, run.registering_s = dns_peers.start_consulate(
        sys.executable, f"{base}.1", work, plan.server_cpus, services)
    servers["consulate"] = consulate
    run.notes["consulate"] = (f"`consulate agent --no-iptables`, {len(services)} services "
                              f"registered over HTTP in {run.registering_s:.1f} s; "
                              f"{consulate.note}")
    try:
        for number, name in enumerate(plan.servers, start=2):
            if name == "consulate":
                continue
            peer_dir = work / name
            peer_dir.mkdir()
            if name == A_ONLY:
                a_only = [Service(s.name, [], s.vip) for s in services]
                servers[name] = dns_peers.start_dnsmasq(f"{base}.{number}", peer_dir,
                                                        plan.server_cpus, a_only)
                servers[name].name = name
                continue
            start = dns_peers.PEERS[name][1]
            servers[name] = start(f"{base}.{number}", peer_dir, plan.server_cpus, services)
    except BaseException:
        for server in servers.values():
            server.stop()
        agent.stop()
        raise
    return servers, agent


def check_all(plan: Plan, servers: dict[str, Server], services: list[Service],
              run: Run) -> None:
    """Every query of every mix once to every server; the wrong ones are not measured."""
    for mix in plan.mixes:
        run.checks[mix] = {}
        for name, server in servers.items():
            if not serves(name, mix):
                continue
            check = dns_peers.check_answers(server.address, server.port, services, mix)
            run.checks[mix][name] = check
            print(f"  check {mix:<6} {name:<15} {check.summary()[:150]}", flush=True)


def _skip_reason(name: str, mix: str, run: Run) -> tuple[str, str] | None:
    """(error, chart word) when a server is not measured in a mix."""
    if not serves(name, mix):
        return "serves A records only: not measured in this mix", "not served"
    check = run.checks[mix].get(name)
    if check is not None and not check.ok:
        return check.summary(), "wrong answers"
    return None


def _measure(cell: report.Cell, label: str, measure: Callable[[], dict[str, float]],
             server: Server, shown: Sequence[Metric]) -> None:
    try:
        server.group.check_alive()
        sample = measure()
    except (LoadError, PeerError, subprocess.SubprocessError) as exc:
        cell.errors.append(_short(exc))
        print(f"  {label} FAILED: {_short(exc)}", flush=True)
        return
    cell.samples.append(sample)
    print(f"  {label} " + "  ".join(f"{m.key}={m.fmt(sample.get(m.key))}" for m in shown),
          flush=True)


def measure_rep(plan: Plan, rep: int, servers: dict[str, Server],
                query_files: dict[str, Path], run: Run) -> None:
    names = list(servers)
    turn = rep % len(names)
    order = names[turn:] + names[:turn]
    for mix in plan.mixes:
        for name in order:
            if _skip_reason(name, mix, run) is None:
                server = servers[name]
                _measure(run.results[qps_key(mix)][name], f"{mix:<6} {name:<15} dnsperf",
                         functools.partial(dnsperf, server, query_files[mix], plan.duration,
                                           plan.outstanding, plan.client_cpus,
                                           SERVER_CPUS if plan.pin else None),
                         server, (QPS, SERVER_CPU, CLIENT_CPU, OTHER))
    for rate in plan.rates:
        for mix in plan.mixes:
            for name in order:
                if _skip_reason(name, mix, run) is None:
                    server = servers[name]
                    _measure(run.results[latency_key(mix, rate)][name],
                             f"{mix:<6} {name:<15} {rate:>7g} q/s",
                             functools.partial(probe, server, query_files[mix], rate,
                                               plan.duration, plan.client_cpus,
                                               SERVER_CPUS if plan.pin else None),
                             server, (P50, P99, LOST, OTHER))


# -- freshness -----------------------------------------------------------------------------


def _poll(resolver: dns_peers.Resolver, name: str, qtype: str,
          done: Callable[[DNSRecord], bool], limit: float) -> float:
    """Ask again and again (one query in flight) until ``done``; returns the time."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(PeerError):
            if done(resolver.ask(name, qtype, timeout=0.05)):
                return time.monotonic()
    raise PeerError(f"{name} {qtype} did not change within {limit:.0f} s")


def _has_records(count: int) -> Callable[[DNSRecord], bool]:
    def done(reply: DNSRecord) -> bool:
        return dns_peers.rcode_name(reply) == "NOERROR" and len(reply.rr) == count
    return done


def freshness(agent: Agent, server: Server, services: list[Service], events: int,
              with_srv: bool, run: Run) -> None:
    """Time from the HTTP call that changes the registry to the first DNS answer showing
    the change: a new service (A appears), its removal (NXDOMAIN), and, when consulate
    answers SRV, one more instance of an existing service (SRV grows) and its removal."""
    resolver = dns_peers.Resolver(server.address, server.port)
    kinds = {"new service: A answered": "register", "deregistered service: NXDOMAIN": "gone"}
    if with_srv:
        kinds |= {"new instance: SRV grows": "grow", "removed instance: SRV shrinks": "shrink"}
    for kind in kinds:
        run.freshness[kind] = []
    rng = random.Random(4)
    try:
        for event in range(events):
            fresh = dns_peers.Instance(f"fresh{event:03d}-1", f"127.103.{event // 256}."
                                       f"{event % 256}", 30000 + event)
            name = f"fresh{event:03d}"
            start = time.monotonic()
            agent.register(fresh, name)
            run.http_ms.append(1e3 * (time.monotonic() - start))
            seen = _poll(resolver, f"{name}.service.consul", "A",
                         lambda r: dns_peers.rcode_name(r) == "NOERROR"
                         and len(dns_peers.a_addresses(r)) == 1, 5.0)
            run.freshness["new service: A answered"].append(1e3 * (seen - start))
            start = time.monotonic()
            agent.deregister(fresh.id)
            run.http_ms.append(1e3 * (time.monotonic() - start))
            seen = _poll(resolver, f"{name}.service.consul", "A",
                         lambda r: dns_peers.rcode_name(r) == "NXDOMAIN", 5.0)
            run.freshness["deregistered service: NXDOMAIN"].append(1e3 * (seen - start))
            if with_srv:
                service = rng.choice(services)
                extra = dns_peers.Instance(f"{service.name}-fresh{event}",
                                           f"127.104.{event // 256}.{event % 256}", 31000)
                count = len(service.instances)
                start = time.monotonic()
                agent.register(extra, service.name)
                seen = _poll(resolver, service.srv_name, "SRV", _has_records(count + 1), 5.0)
                run.freshness["new instance: SRV grows"].append(1e3 * (seen - start))
                start = time.monotonic()
                agent.deregister(extra.id)
                seen = _poll(resolver, service.srv_name, "SRV", _has_records(count), 5.0)
                run.freshness["removed instance: SRV shrinks"].append(1e3 * (seen - start))
            time.sleep(0.02)
    finally:
        resolver.close()


# -- profile ---------------------------------------------------------------------------------


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def _frame(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (path/file.py)``: lines of one function merge."""
    return re.sub(r":\d+\)$", ")", frame.strip())


def _stacks(raw: str) -> Iterator[tuple[list[str], int]]:
    """(frames root first, samples) from py-spy's raw (collapsed) output."""
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def summarize_profile(raw: str, top: int = 12) -> list[tuple[str, float, float]]:
    """(function, % of samples with it on the stack, % with it on top), most inclusive
    first; frames on (nearly) every stack (the event loop's callers) left out."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for stack, count in _stacks(raw):
        frames = [_frame(f) for f in stack]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return []
    rows = [(frame, 100 * n / total, 100 * own[frame] / total)
            for frame, n in inclusive.most_common() if n < 0.99 * total]
    return rows[:top]


def _source(frame: str) -> str:
    """The code of ``func (path.py:123)``, looked up below the repository and sys.path."""
    found = re.search(r"\((.+):(\d+)\)$", frame)
    if found is None:
        return ""
    for base in (ROOT, *map(Path, sys.path)):
        path = base / found.group(1)
        if path.is_file():
            return linecache.getline(str(path), int(found.group(2))).strip()
    return ""


def hot_lines(raw: str, top: int = 6) -> list[tuple[str, float, str]]:
    """(innermost Python line, % of samples, its code): where the time is spent, C calls
    (a socket's sendto, uvloop's own loop) included, as the line that made them."""
    own: collections.Counter[str] = collections.Counter()
    for stack, count in _stacks(raw):
        own[stack[-1].strip()] += count
    total = sum(own.values())
    return [(frame, 100 * n / total, _source(frame)) for frame, n in own.most_common(top)]


def profile(agent_server: Server, queries: Path, duration: float, outstanding: int,
            cpus: set[int] | None, work: Path, run: Run) -> None:
    """py-spy on the agent while dnsperf loads it: where its core goes."""
    spy = _py_spy()
    if spy is None:
        run.profile_note = "not profiled: py-spy is not installed (pip install py-spy)"
        return
    raw = work / "profile.txt"
    argv = [*taskset(cpus), spy, "record", "--pid", str(agent_server.group.popen.pid),
            "--duration", f"{duration + 1:g}", "--rate", "250", "--format", "raw",
            "--output", str(raw)]
    recorder = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        load = dnsperf(agent_server, queries, duration, outstanding, cpus)
        output, _ = recorder.communicate(timeout=duration + SLACK)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    if not raw.exists():
        run.profile_note = f"py-spy wrote nothing: {output.decode(errors='replace')[-200:]}"
        return
    run.profile = summarize_profile(raw.read_text())
    run.profile_lines = hot_lines(raw.read_text())
    samples = re.search(r"Samples: (\d+)", output.decode(errors="replace"))
    run.profile_note = (f"py-spy record at 250 Hz (it pauses the agent to sample, so the "
                        f"agent answered {load[QPS.key]:,.0f} q/s meanwhile), "
                        f"{samples.group(1) if samples else '?'} samples of GIL-holding "
                        "Python threads, A mix under dnsperf")


# -- the report ------------------------------------------------------------------------------


def tool_version(argv: Sequence[str]) -> str:
    """The first dotted version number a tool prints about itself."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({exc})"
    found = re.search(r"\d+(?:\.\d+)+", done.stdout + done.stderr)
    return found.group(0) if found else "unknown"


def _machine() -> list[tuple[str, str]]:
    model = cpu_model()
    packages = ", ".join(f"{name} {importlib.metadata.version(name)}"
                         for name in ("uvloop", "dnslib", "consulate"))
    return [("cores", f"{os.cpu_count()} x {model}"), ("kernel (uname -r)", platform.release()),
            ("dnsperf", tool_version(["dnsperf", "-h"])),
            ("dnsmasq", tool_version(["dnsmasq", "--version"])),
            ("unbound", tool_version(["unbound", "-V"])),
            ("python", f"{platform.python_version()}; {packages}")]


def _conditions(plan: Plan, args: argparse.Namespace, elapsed: float) -> list[tuple[str, str]]:
    pinning = (f"every server (all its threads) on CPU {min(SERVER_CPUS)} from its start "
               f"(taskset), dnsperf / prober / freshness poller / py-spy on CPU "
               f"{min(CLIENT_CPUS)}" if plan.pin else
               "not applied (--no-pin, or CPUs 0 and 1 are not both usable)")
    return [
        ("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")),
        ("command", " ".join(["python -m bench.dns", *sys.argv[1:]])),
        ("repetitions", f"{plan.reps}; servers take turns within each repetition, in an "
                        "order rotated by one per repetition; they stay up all run"),
        ("service set", f"{args.services} services svc0000.. with 1, 2, 3 instances in turn "
                        "(127.100-102.x.y, distinct ports); VIPs as the agent allocated them"),
        ("answer check", "before measuring, every query of a mix once to every server, "
                         "compared with the service set (rcode, the VIP; SRV ports and target "
                         "addresses from glue or the target's A record); a server with any "
                         "wrong answer is not measured in that mix"),
        ("throughput", f"dnsperf -c 1 -T 1 -q {plan.outstanding} -l {plan.duration:g} over "
                       "the mix's query file; a run with over 1 % lost or non-NOERROR "
                       "answers counts as failed; CPU = user+system time of the server's "
                       "process group (or of dnsperf) / wall time"),
        ("latency", f"bench/dns_probe.py: open loop at {', '.join(f'{r:,.0f}' for r in plan.rates)}"
                    f" q/s for {plan.duration:g} s after 1 s of warm-up, one UDP socket, "
                    "round trip from before sendto to the kernel's receive timestamp "
                    "(SO_TIMESTAMPNS); no answer within 1 s = lost (dnsperf 2.10 prints no "
                    "percentiles)"),
        ("pinning", pinning),
        ("total runtime", f"{elapsed / 60:.1f} min"),
    ]


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def _median_ratio(cells: dict[str, report.Cell], key: str, ref: str) -> float | None:
    ours = cells["consulate"].median(key) if "consulate" in cells else None
    theirs = cells[ref].median(key) if ref in cells else None
    return ours / theirs if ours is not None and theirs else None


def targets(plan: Plan, run: Run) -> list[tuple[str, str]]:
    """Issue 4's targets, one row each, with what this run measured."""
    rows = []
    for mix in plan.mixes:
        cells = run.results[qps_key(mix)]
        for ref, goal in (("dnsmasq", TARGET_VS_DNSMASQ), ("unbound", TARGET_VS_UNBOUND)):
            ratio = _median_ratio(cells, QPS.key, ref)
            why = "" if ratio is not None else (cells["consulate"].status or "no result")
            text = (f"{ratio:.2f}x: {_verdict(ratio >= goal)}" if ratio is not None
                    else f"— ({why})")
            capacity = _median_ratio(cells, CAPACITY.key, ref)
            if capacity is not None:
                text += f" (by CPU per query: {capacity:.2f}x)"
            rows.append((f"q/s consulate / {ref} >= {goal:g}x ({mix} mix)", text))
    if TARGET_P99_AT in plan.rates:
        for mix in plan.mixes:
            cells = run.results[latency_key(mix, TARGET_P99_AT)]
            cell = cells["consulate"]
            p99, lost = cell.median(P99.key), cell.median(LOST.key)
            text = (f"{p99:,.0f} µs, {lost:.2f} % lost: "
                    f"{_verdict(p99 < TARGET_P99_US and lost < 100 * MAX_FAILED_SHARE)}"
                    if p99 is not None and lost is not None
                    else f"— ({cell.status or 'no result'})")
            peers = [f"{name} {value:,.0f} µs" for name in ("dnsmasq", "unbound")
                     if name in cells and (value := cells[name].median(P99.key)) is not None]
            if peers:
                text += f" (same run: {', '.join(peers)})"
            rows.append((f"p99 < 1 ms at {TARGET_P99_AT:,.0f} q/s ({mix} mix)", text))
    for kind, values in run.freshness.items():
        if values:
            p99 = _percentile(values, 0.99)
            rows.append((f"registry change -> new answer p99 < {TARGET_FRESH_MS:g} ms ({kind})",
                         f"{p99:.1f} ms: {_verdict(p99 < TARGET_FRESH_MS)}"))
    return rows


def _percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def _qps_notes(plan: Plan, run: Run, names: Sequence[str]) -> str:
    """Which throughput figures the load generator or other load may have bounded."""
    notes = []
    for mix in plan.mixes:
        cells = run.results[qps_key(mix)]
        for name in names:
            client, other = cells[name].median(CLIENT_CPU.key), cells[name].median(OTHER.key)
            if client is not None and client >= 90:
                notes.append(f"{mix} mix, {name}: dnsperf used {client:.0f} % of its core, so "
                             "the load generator may be the limit: the server answers at "
                             "least this many q/s, and ratios against it are upper bounds")
            if other is not None and other >= 10:
                notes.append(f"{mix} mix, {name}: {other:.0f} % of the server's core went to "
                             "other processes (a shared machine): the figure is low by up to "
                             "that much")
    if not notes:
        return "No throughput figure was bounded by dnsperf's core or by other load.\n"
    return "".join(f"- {note}\n" for note in notes)


def _checks_table(plan: Plan, run: Run) -> str:
    lines = ["| mix | server | answers | mean answer size (bytes) |", "|---|---|---|---|"]
    for mix in plan.mixes:
        for name, check in run.checks[mix].items():
            lines.append(f"| {mix} | {name} | {check.summary()[:200].replace('|', '/')} | "
                         f"{check.mean_reply_bytes:.0f} |")
    return "\n".join(lines) + "\n"


def _freshness_table(run: Run) -> str:
    lines = ["| registry change (HTTP PUT) -> first DNS answer showing it | events | p50 (ms) "
             "| p99 (ms) | max (ms) |", "|---|---|---|---|---|"]
    for kind, values in [*run.freshness.items(), ("the HTTP PUT alone", run.http_ms)]:
        if values:
            lines.append(f"| {kind} | {len(values)} | {statistics.median(values):.1f} | "
                         f"{_percentile(values, 0.99):.1f} | {max(values):.1f} |")
    return "\n".join(lines) + "\n"


def _profile_table(run: Run) -> str:
    if not run.profile:
        return run.profile_note + "\n"
    lines = [run.profile_note + ":\n", "| function (file) | on stack (% of samples) | on top |",
             "|---|---|---|"]
    lines += [f"| `{name}` | {incl:.1f} | {own:.1f} |" for name, incl, own in run.profile]
    lines += ["\nThe lines the samples stopped in (a C call such as `sendto`, or uvloop's own "
              "loop, shows as the Python line that made it):\n",
              "| line | % of samples | code |", "|---|---|---|"]
    lines += [f"| `{frame}` | {share:.1f} | `{code.replace('|', '/')}` |"
              for frame, share, code in run.profile_lines]
    return "\n".join(lines) + "\n"


def latency_chart(plan: Plan, run: Run, names: Sequence[str], path: Path) -> None:
    """Percentile curves per server (median over reps, min-max band), log scale, one
    panel per (mix, rate); the 1 ms target drawn at 20,000 q/s."""
    panels = [(mix, rate) for rate in plan.rates for mix in plan.mixes]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6),
                                    squeeze=False)
    for ax, (mix, rate) in zip(axes[0], panels, strict=True):
        cells = run.results[latency_key(mix, rate)]
        xs = range(len(PERCENTILE_KEYS))
        for name in names:
            cell = cells.get(name)
            if cell is None or not cell.samples:
                continue
            rows = [cell.values(key) for key, _ in PERCENTILE_KEYS]
            lost = cell.median(LOST.key) or 0.0
            label = name + (f" ({lost:.1f} % lost)" if lost >= 0.1 else "")
            ax.plot(xs, [statistics.median(r) for r in rows], marker="o", label=label,
                    color=report.colour(name))
            ax.fill_between(xs, [min(r) for r in rows], [max(r) for r in rows], alpha=0.15,
                            color=report.colour(name))
        if rate == TARGET_P99_AT:
            ax.axhline(TARGET_P99_US, color="red", linestyle="--", linewidth=0.8,
                       label="target: p99 < 1 ms")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [label for _, label in PERCENTILE_KEYS])
        ax.set_ylabel("round trip (µs, log scale)")
        ax.set_title(f"{rate:,.0f} q/s offered, {mix} mix", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("DNS answer latency at a fixed rate (client side, lower is better)\n"
                 "lines: median of repetitions, bands: min-max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def freshness_chart(run: Run, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for kind, values in run.freshness.items():
        ordered = sorted(values)
        if ordered:
            ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))],
                    where="post", label=kind)
    ax.axvline(TARGET_FRESH_MS, color="red", linestyle="--", linewidth=0.8,
               label=f"target: p99 < {TARGET_FRESH_MS:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("registry change (HTTP PUT sent) -> first DNS answer showing it (ms)")
    ax.set_ylabel("share of events")
    ax.set_title("consulate: how soon DNS answers follow the registry", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def qps_section(mix: str, plan: Plan) -> Section:
    return Section(qps_key(mix), f"Queries per second, {mix} mix (dnsperf, "
                   f"{plan.outstanding} in flight, server on one core)", (QPS,),
                   f"dns-qps-{slug(mix)}.png",
                   (CAPACITY, SERVER_CPU, CPU_PER_QUERY, USER_PER_QUERY, CLIENT_CPU, OTHER,
                    MEAN_LATENCY, LOST),
                   versus=("dnsmasq", "unbound"))


def latency_section(mix: str, rate: float) -> Section:
    return Section(latency_key(mix, rate), f"Latency at {rate:,.0f} q/s, {mix} mix "
                   "(bench/dns_probe.py, open loop)", (P50, P99), "dns-latency.png",
                   (P999, MAX, LOST, ACHIEVED, OTHER), versus=("dnsmasq", "unbound"))


def write(plan: Plan, args: argparse.Namespace, run: Run, names: list[str],
          elapsed: float) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    server_rows = [("consulate", run.notes.get("consulate", ""))]
    server_rows += [(name, dns_peers.PEERS[name][0]) for name in names if name in dns_peers.PEERS]
    if A_ONLY in names:
        server_rows.append((A_ONLY, "dnsmasq as above with the A records only (no srv-host): "
                                    "shows what dnsmasq's SRV records cost it in the A mix"))
    server_rows += [(f"mix {mix}", dns_peers.MIXES[mix]) for mix in plan.mixes]
    preamble = [("Targets (issue 4)", targets(plan, run)), ("Machine", _machine()),
                ("Conditions", _conditions(plan, args, elapsed)),
                ("Servers and query mixes", server_rows)]
    qps_sections = [qps_section(mix, plan) for mix in plan.mixes]
    text = report.markdown("DNS benchmark: consulate vs dnsmasq and unbound", preamble,
                           qps_sections, run.results, names, plan.reps)
    parts = [text, "\n## Reading the throughput figures\n\n", _qps_notes(plan, run, names),
             "\n## Answer checks (before measuring)\n\n", _checks_table(plan, run)]
    for rate in plan.rates:
        for mix in plan.mixes:
            section = latency_section(mix, rate)
            parts += [f"\n## {section.title}\n\n",
                      report.table(section, run.results[section.key], names, plan.reps)]
    parts.append("\n![latency percentiles](dns-latency.png)\n")
    parts += ["\n## Freshness: registry change -> DNS answer (consulate)\n\n",
              "Each event: the HTTP call, then one query at a time to the agent (50 ms "
              "timeout) until the answer shows the change; the time runs from sending the "
              "HTTP call. Events are 20 ms apart, the agent otherwise idle.\n\n",
              _freshness_table(run), "\n![freshness](dns-freshness.png)\n",
              "\n## Where consulate's core goes (profile)\n\n", _profile_table(run)]
    (out / "dns.md").write_text("".join(parts))
    for section in qps_sections:
        report.chart(section, run.results[section.key], names, out / section.chart)
    latency_chart(plan, run, names, out / "dns-latency.png")
    if run.freshness:
        freshness_chart(run, out / "dns-freshness.png")
    raw = {"results": report.results_json(run.results),
           "checks": {mix: {name: {"ok": c.ok, "replies": c.replies,
                                   "mean_reply_bytes": c.mean_reply_bytes,
                                   "wrong": c.wrong[:5]} for name, c in checks.items()}
                      for mix, checks in run.checks.items()},
           "freshness_ms": run.freshness, "http_put_ms": run.http_ms,
           "profile": run.profile, "profile_lines": run.profile_lines}
    (out / "dns.json").write_text(json.dumps(raw, indent=1) + "\n")


# -- main ------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dns",
        description="Measure consulate's DNS responder against dnsmasq and unbound serving "
                    "the same records, on 127.0.0.0/8 (needs dnsperf, dnsmasq, unbound).")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"comma-separated, from: {', '.join(SERVERS)} (default: all; "
                             "consulate is always measured)")
    parser.add_argument("--mixes", default=",".join(dns_peers.MIXES),
                        help=f"query mixes, from: {', '.join(dns_peers.MIXES)} (default: all)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per dnsperf or prober run (default 10)")
    parser.add_argument("--rates", default=f"{TARGET_P99_AT:g}",
                        help="fixed rates (q/s) for the latency runs, comma-separated "
                             f"(default {TARGET_P99_AT:g})")
    parser.add_argument("--outstanding", type=int, default=300,
                        help="dnsperf -q: queries in flight (default 300: fewer leave both "
                             "server and dnsperf waiting on each other's wake-ups)")
    parser.add_argument("--services", type=int, default=1000,
                        help="size of the service set (default 1000)")
    parser.add_argument("--events", type=int, default=50,
                        help="freshness events per kind (default 50)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin servers and load generators to separate cores")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 repetition of 2 s, 5 freshness events, a 2 s "
                             "profile")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"directory for dns.md, PNGs and dns.json (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.duration, args.events = 1, 2.0, 5
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    if unknown := [n for n in names if n not in SERVERS]:
        parser.error(f"unknown server(s) {', '.join(unknown)}: use any of {', '.join(SERVERS)}")
    if unknown := [m for m in mixes if m not in dns_peers.MIXES]:
        parser.error(f"unknown mix(es) {', '.join(unknown)}: use any of "
                     f"{', '.join(dns_peers.MIXES)}")
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates {args.rates!r}: numbers, comma-separated")
    args.servers = ["consulate", *dict.fromkeys(n for n in names if n != "consulate")]
    args.mixes = mixes
    if (args.reps < 1 or args.duration <= 0 or args.outstanding < 1 or args.services < 1
            or args.events < 0 or not mixes or any(r <= 0 for r in args.rates)):
        parser.error("--reps, --outstanding, --services at least 1, --duration and --rates "
                     "above 0, --events not negative, at least one mix")
    return args


def _missing_tools() -> list[str]:
    return [tool for tool in ("dnsperf", "dnsmasq", "unbound", "unbound-checkconf", "taskset")
            if shutil.which(tool) is None]


@contextlib.contextmanager
def _on_cpus(cpus: set[int] | None) -> Iterator[None]:
    """Run this process (the freshness poller) on ``cpus`` for a while."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if missing := _missing_tools():
        print(f"bench.dns: error: {', '.join(missing)} not found: install the Debian packages "
              "dnsperf dnsmasq-base unbound util-linux (or run `make bench-dns`)",
              file=sys.stderr)
        return 1
    plan = Plan(args.servers, args.mixes, args.rates, args.reps, args.duration,
                args.outstanding,
                pin=not args.no_pin and os.sched_getaffinity(0) >= SERVER_CPUS | CLIENT_CPUS)
    signals.interrupt_on_signals()  # unwind: every server is stopped on the way out
    names: list[str] = plan.servers
    run = Run()
    for mix in plan.mixes:
        run.results[qps_key(mix)] = {name: report.Cell() for name in names}
        for rate in plan.rates:
            run.results[latency_key(mix, rate)] = {name: report.Cell() for name in names}
    work = Path(tempfile.mkdtemp(prefix="consulate-bench-dns-"))
    started = time.monotonic()
    services = dns_peers.service_set(args.services)
    query_files = {mix: dns_peers.write_queries(services, mix, work / f"queries-{slug(mix)}.txt")
                   for mix in plan.mixes}
    try:
        print(f"starting servers ({args.services} services) in {work}", flush=True)
        servers, agent = start_servers(plan, work, services, run)
        try:
            check_all(plan, servers, services, run)
            for mix in plan.mixes:
                keys = [qps_key(mix), *(latency_key(mix, rate) for rate in plan.rates)]
                for name in names:
                    if skip := _skip_reason(name, mix, run):
                        for key in keys:
                            run.results[key][name].errors.append(skip[0])
                            run.results[key][name].status = skip[1]
            for rep in range(plan.reps):
                print(f"repetition {rep + 1}/{plan.reps}", flush=True)
                measure_rep(plan, rep, servers, query_files, run)
            srv_ok = "a+srv" in run.checks and run.checks["a+srv"]["consulate"].ok
            if args.events:
                print(f"freshness: {args.events} events per kind", flush=True)
                with _on_cpus(plan.client_cpus):
                    freshness(agent, servers["consulate"], services, args.events, srv_ok, run)
            if not args.no_profile and "a" in query_files:
                print("profile: py-spy on the agent under dnsperf", flush=True)
                profile(servers["consulate"], query_files["a"], plan.duration,
                        plan.outstanding, plan.client_cpus, work, run)
        finally:
            for server in servers.values():
                server.stop()
            agent.stop()
    except KeyboardInterrupt:
        print(f"bench.dns: interrupted; every server stopped (logs kept in {work})",
              file=sys.stderr)
        return 130
    except (PeerError, LoadError, OSError) as exc:
        print(f"bench.dns: error: {exc} (logs kept in {work})", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    shutil.rmtree(work, ignore_errors=True)
    write(plan, args, run, names, elapsed)
    print(f"done in {elapsed / 60:.1f} min: {args.out / 'dns.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
