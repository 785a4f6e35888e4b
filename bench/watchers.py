"""Watchers benchmark: 10,000 long polls or event streams on one agent (issue 5, point 7).

"At least 10,000 concurrent long-poll or SSE watchers on one agent; a write wakes
only the watchers of that service." Three kinds of watcher take turns on a fresh
``consulate agent`` each (an order rotated by one per repetition):

- ``long-poll``: Discoverd's ``GET /v1/discover/services/<s>/instances?index=N&wait=10m``,
  served by the watch hub (control/registry/hub.py);
- ``sse``: the same path with ``Accept: text/event-stream``, also from the hub;
- ``consul-blocking``: the Consul-compatible blocking query
  ``GET /v1/catalog/service/<s>?index=N&wait=10m``, which waits on the registry's
  global index: the baseline, a peer in the same run that wakes on any write.

Per kind and repetition: the agent's RSS (VmRSS) with 0 and then ``--steps``
watchers open (spread evenly over ``--services`` services, held by ``--clients``
processes, bench/watchers_client.py); then ``--writes`` writes, each registering
one new instance of one service through the Discoverd API, counting which
watchers wake and when. A wake-up's latency is the watcher's CLOCK_MONOTONIC
stamp of the bytes that complete its answer (or event) minus the writer's stamp
when the PUT returned: every process is on this machine and the clock is
system-wide. Results go to ``watchers.md``, PNGs and the raw samples in
``watchers.json``.

    python -m bench.watchers [--reps 3] [--steps 1000,5000,10000] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bench/watchers.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib.pyplot as plt
from matplotlib.ticker import StrMethodFormatter

from bench import report
from bench.dns import cpu_busy, hot_lines, summarize_profile
from bench.dns_peers import Agent
from bench.machine import cpu_model
from bench.peers import CLK_TCK, Group, PeerError, taskset
from bench.report import Metric, Section
from bench.signals import run_main

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ADDRESS = "127.0.0.1"
AGENT_CPUS = {1}  # the agent, all of its threads
CLIENT_CPUS = {0}  # the watcher clients and this process (the writer)
NOFILE = 65536  # descriptors for this process, the agent and the clients (inherited)
SETTLE_TIMEOUT = 60.0  # seconds for the agent to go idle after opening or a write
WAKE_TIMEOUT = 60.0  # seconds for a write's watchers to wake
QUIET_CPU = 0.005  # seconds of event-loop CPU per SETTLE_WINDOW that still count as idle
SETTLE_WINDOW = 0.25
REPLY_TIMEOUT = 180.0  # seconds for a client to answer a command
PROFILED = ("long-poll", "sse")  # profiled in the last repetition: the hub's two paths
PROFILE_RATE = 250  # py-spy samples per second
IDLE_FRAMES = ("epoll_wait", "epoll_pwait")  # innermost frames of a loop waiting for events
HEAVY = 1.5  # a write with more than this times the median loop CPU had extra work
INSTANCE_TTL = "1h"  # Discoverd's default (10 s) would expire mid-run and wake watchers

VARIANTS: dict[str, tuple[str, str]] = {  # name -> (client mode, description)
    "long-poll": ("poll", "Discoverd API long poll, `GET /v1/discover/services/<s>/instances"
                          "?index=N&wait=10m` (the watch hub: per-service waiters)"),
    "sse": ("sse", "Discoverd API event stream, the same path with `Accept: text/event-stream`"
                   " (the watch hub: one queue per stream)"),
    "consul-blocking": ("consul", "baseline: Consul blocking query `GET /v1/catalog/service/"
                                  "<s>?index=N&wait=10m`, which waits on the registry's global "
                                  "index (control/http_api.py `_block`)"),
}
BASELINE = "consul-blocking"

KIB_SLOPE = Metric("kib_slope", "memory per watcher (least-squares slope)", "KiB", False, 2)
KIB_AVG = Metric("kib_avg", "(RSS at max - RSS at 0) / max", "KiB", False, 2)
WOKEN = Metric("woken", "watchers woken per write", "watchers", False, 0)
OWN = Metric("own", "of them the written service's", "watchers", False, 0)
OTHERS = Metric("others", "of other services", "watchers", False, 0)
MISSED = Metric("missed", "written service's watchers not woken", "watchers", False, 0)
WOKEN_MAX = Metric("woken_max", "most woken by one write", "watchers", False, 0)
CPU_PER_WRITE = Metric("cpu_ms", "agent CPU per write", "ms", False, 1)
CPU_MAX = Metric("cpu_max_ms", "agent CPU of the costliest write", "ms", False, 0)
P50 = Metric("p50_ms", "p50", "ms", False, 2)
P99 = Metric("p99_ms", "p99", "ms", False, 2)
MAX = Metric("max_ms", "max", "ms", False, 2)
LAST = Metric("last_ms", "last woken watcher of any service (median over writes)", "ms",
              False, 1)
PUT = Metric("put_ms", "PUT round trip (median)", "ms", False, 2)
P99_SENT = Metric("p99_sent_ms", "p99 from the PUT sent", "ms", False, 2)
CPU_PER_WAKE = Metric("cpu_us_per_wake", "agent CPU per woken watcher", "µs", False, 0)
EARLY = Metric("early_pct", "wakes stamped before the PUT returned", "%", False, 1)
OTHER = Metric("other_pct", "other processes' load on the agent's core during the writes",
               "% of it", False, 0)


def rss_key(count: int) -> str:
    return f"rss_{count}"


def _sections(steps: Sequence[int]) -> tuple[Section, Section, Section]:
    top = steps[-1]
    memory = Section("memory", f"Agent memory per watcher (RSS at 0, {_counts(steps)} watchers)",
                     (KIB_SLOPE,), "watchers-memory.png",
                     (KIB_AVG, *(Metric(rss_key(n), f"RSS at {n:,}", "MiB", False, 1)
                                 for n in (0, *steps))),
                     versus=(BASELINE,))
    wakes = Section("wakes", f"Watchers woken per write ({top:,} watchers open)",
                    (WOKEN,), "watchers-wakes.png",
                    (OWN, OTHERS, MISSED, WOKEN_MAX, CPU_PER_WRITE, CPU_PER_WAKE, CPU_MAX),
                    versus=(BASELINE,))
    latency = Section("latency", f"Wake-up latency of the written service's watchers, "
                      f"{top:,} watchers open (PUT returned -> answer or event received)",
                      (P50, P99, MAX), "watchers-latency.png",
                      (P99_SENT, LAST, PUT, EARLY, OTHER),
                      versus=(BASELINE,))
    return memory, wakes, latency


def _counts(steps: Sequence[int]) -> str:
    return ", ".join(f"{n:,}" for n in steps)


# -- processes -----------------------------------------------------------------------------


def mono() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def loop_cpu(pid: int) -> float:
    """Seconds the agent's main thread (its event loop) has run, in ns resolution
    (/proc/PID/schedstat of the thread group leader); clock ticks are 10 ms."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise PeerError(f"no VmRSS for pid {pid}")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]
    return "?"


def settle(pid: int, timeout: float = SETTLE_TIMEOUT) -> bool:
    """Until the agent's loop ran at most QUIET_CPU over SETTLE_WINDOW; False on timeout."""
    deadline = mono() + timeout
    last = loop_cpu(pid)
    while mono() < deadline:
        time.sleep(SETTLE_WINDOW)
        now = loop_cpu(pid)
        if now - last <= QUIET_CPU:
            return True
        last = now
    return False


class WatcherClient:
    """One bench/watchers_client.py process, driven over its stdin and stdout."""

    def __init__(self, number: int, mode: str, port: int, work: Path,
                 cpus: set[int] | None) -> None:
        log_path = work / f"client-{number}.log"
        argv = [*taskset(cpus), sys.executable, "-m", "bench.watchers_client", ADDRESS,
                str(port), mode]
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log,
                                     start_new_session=True)
        self.group = Group(f"watcher client {number}", popen, log_path)

    def send(self, message: dict[str, Any]) -> None:
        stdin = self.group.popen.stdin
        assert stdin is not None
        stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        stdin.flush()

    def receive(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        stdout = self.group.popen.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        if not ready:
            raise PeerError(f"{self.group.name} did not answer in {timeout:.0f} s")
        line = stdout.readline()
        if not line:
            self.group.check_alive()
            raise PeerError(f"{self.group.name} closed its output: {self.group.log_tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        if self.group.popen.poll() is None:
            try:
                self.send({"op": "close"})
                self.receive(10.0)
                self.group.popen.wait(5.0)
            except (OSError, PeerError, ValueError, subprocess.TimeoutExpired):
                pass
        for stream in (self.group.popen.stdin, self.group.popen.stdout):
            if stream is not None:
                stream.close()
        self.group.stop()


def ask_all(clients: Sequence[WatcherClient], messages: Sequence[dict[str, Any]],
            timeout: float = REPLY_TIMEOUT) -> list[dict[str, Any]]:
    """Send one command to each client (they work at once), then read every answer."""
    for client, message in zip(clients, messages, strict=True):
        client.send(message)
    return [client.receive(timeout) for client in clients]


# -- one kind of watcher on a fresh agent ---------------------------------------------------


@dataclass
class Plan:
    variants: list[str]
    steps: list[int]
    services: int
    writes: int
    baseline_writes: int
    clients: int
    reps: int
    pin: bool
    profile_writes: int = 0  # 0: no profile
    gc_trace_writes: int = 0  # 0: no GC trace run

    @property
    def agent_cpus(self) -> set[int] | None:
        return AGENT_CPUS if self.pin else None

    @property
    def client_cpus(self) -> set[int] | None:
        return CLIENT_CPUS if self.pin else None

    def service(self, number: int) -> str:
        return f"w{number:03d}"

    def writes_of(self, variant: str) -> int:
        return self.baseline_writes if variant == BASELINE else self.writes


@dataclass
class Profile:
    """Where the agent's CPU went over some writes (bench/dns.py's summaries)."""

    functions: list[tuple[str, float, float]] = field(default_factory=list)
    lines: list[tuple[str, float, str]] = field(default_factory=list)
    note: str = ""
    gc_pct: float = 0.0  # busy samples with the cyclic GC on the stack
    cpu_ms: list[float] = field(default_factory=list)  # agent CPU of each profiled write


@dataclass
class GcTrace:
    """Collections of at least watchers_gctrace.MIN_MS during the traced run's writes."""

    collections: dict[int, list[float]]  # generation -> ms of each
    cpu_ms: list[float]  # loop CPU of each write
    last_ms: list[float]  # last wake-up of each write
    gc_ms: list[float]  # collections' time within each write


@dataclass
class Outcome:
    """What one kind of watcher did in one repetition."""

    rss: dict[int, float] = field(default_factory=dict)  # watchers open -> MiB
    fds: dict[int, int] = field(default_factory=dict)
    woken: list[int] = field(default_factory=list)  # per write
    own: list[int] = field(default_factory=list)
    own_expected: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)  # the written service's watchers
    sent_ms: list[float] = field(default_factory=list)  # the same from the PUT sent
    last_ms: list[float] = field(default_factory=list)  # per write, any woken watcher
    put_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    other_pct: list[float] = field(default_factory=list)  # other load on the agent's core
    open_errors: list[str] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)  # timeouts, errors, other events
    log_offset: int = 0  # size of the agent's log when the writes began
    windows: list[tuple[float, float]] = field(default_factory=list)  # each write, CLOCK_MONOTONIC
    nofile: str = ""


def _open_step(plan: Plan, clients: Sequence[WatcherClient], have: int, want: int,
               outcome: Outcome) -> None:
    """Open watchers ``have`` up to ``want``, spread evenly over the services; a service's
    watchers spread over every client."""
    batches: list[list[tuple[int, str]]] = [[] for _ in clients]
    for k in range(have, want):
        number = k % plan.services
        batches[(k // plan.services + number) % len(clients)].append(
            (number, plan.service(number)))
    answers = ask_all(clients, [{"op": "open", "watchers": b} for b in batches])
    for answer in answers:
        outcome.open_errors += answer["errors"]
    opened = sum(a["established"] for a in answers)
    if opened != want - have:
        raise PeerError(f"{opened:,} of {want - have:,} watchers opened (now {have + opened:,} "
                        f"in all): {'; '.join(outcome.open_errors[:3]) or 'timed out'}")


def _counts_for(clients: Sequence[WatcherClient], number: int) -> tuple[int, int]:
    answers = ask_all(clients, [{"op": "count", "service": number}] * len(clients))
    return sum(a["wakes"] for a in answers), sum(a["own"] for a in answers)


def _write(plan: Plan, agent: Agent, clients: Sequence[WatcherClient], pid: int, write: int,
           per_service: dict[int, int], outcome: Outcome) -> None:
    """Register one new instance of one service; collect who woke and when."""
    number = (write * 37) % plan.services  # 37 is prime to 100: distinct services in turn
    name = plan.service(number)
    if not settle(pid):
        raise PeerError("the agent did not go idle before a write")
    ask_all(clients, [{"op": "drain"}] * len(clients))  # nothing stale in this write's count
    ticks, busy, loop = cpu_ticks(pid), cpu_busy(plan.agent_cpus or set()), loop_cpu(pid)
    started = mono()
    agent.api("PUT", f"/v1/discover/services/{name}/instances/bench-{write}",
              {"addr": f"127.0.0.1:{20000 + write}", "ttl": INSTANCE_TTL})
    returned = mono()
    expected = per_service[number]
    deadline = returned + WAKE_TIMEOUT
    total, own = _counts_for(clients, number)
    while own < expected and mono() < deadline:
        time.sleep(0.01)
        total, own = _counts_for(clients, number)
    # Then until nobody else wakes: no new wake-up and an idle agent over one window.
    while mono() < deadline:
        before, last = total, loop_cpu(pid)
        time.sleep(SETTLE_WINDOW)
        total, own = _counts_for(clients, number)
        if total == before and loop_cpu(pid) - last <= QUIET_CPU:
            break
    agent_s = (cpu_ticks(pid) - ticks) / CLK_TCK
    outcome.cpu_ms.append(1e3 * (loop_cpu(pid) - loop))
    if plan.agent_cpus:
        other = cpu_busy(plan.agent_cpus) - busy - agent_s
        outcome.other_pct.append(max(0.0, 100 * other / (mono() - started)
                                     / len(plan.agent_cpus)))
    wakes = [(n, t) for answer in ask_all(clients, [{"op": "drain"}] * len(clients))
             for n, t in answer["wakes"]]
    outcome.put_ms.append(1e3 * (returned - started))
    outcome.woken.append(len(wakes))
    outcome.own.append(sum(1 for n, _ in wakes if n == number))
    outcome.own_expected.append(expected)
    outcome.latencies_ms += [1e3 * (t - returned) for n, t in wakes if n == number]
    outcome.sent_ms += [1e3 * (t - started) for n, t in wakes if n == number]
    outcome.last_ms.append(1e3 * (max(t for _, t in wakes) - returned) if wakes else 0.0)
    outcome.windows.append((started, mono()))


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def _profile(plan: Plan, agent: Agent, clients: Sequence[WatcherClient], pid: int,
             per_service: dict[int, int], raw: Path) -> Profile:
    """py-spy on the agent over ``plan.profile_writes`` more writes (not in the results:
    py-spy pauses the agent for each sample)."""
    spy = _py_spy()
    if spy is None:
        return Profile(note="not profiled: py-spy is not installed (pip install py-spy)")
    argv = [*taskset(plan.client_cpus), spy, "record", "--pid", str(pid), "--rate",
            str(PROFILE_RATE), "--native", "--format", "raw", "--output", str(raw)]
    log_path = raw.with_suffix(".log")
    with open(log_path, "wb") as log:
        recorder = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
    scratch = Outcome()
    try:
        time.sleep(1.0)  # attached
        for write in range(plan.writes, plan.writes + plan.profile_writes):
            _write(plan, agent, clients, pid, write, per_service, scratch)
        recorder.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        recorder.wait(30)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    text = raw.read_text() if raw.exists() else ""
    if not text:
        return Profile(note="py-spy wrote nothing: " + log_path.read_text(errors="replace")[-200:])
    busy, gc, idle = [], 0, 0
    for line in text.splitlines():  # py-spy counts uvloop's wait in epoll as busy: drop it
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        if stack.rsplit(";", 1)[-1].startswith(IDLE_FRAMES):
            idle += int(count)
            continue
        busy.append(line)
        gc += int(count) if "gc_collect_main" in stack else 0
    total = sum(int(line.rpartition(" ")[2]) for line in busy)
    busy_text = "\n".join(busy)
    return Profile(
        functions=summarize_profile(_python_frames(
            "\n".join(line for line in busy if "gc_collect_main" not in line))),
        lines=hot_lines(busy_text, top=8),
        gc_pct=100 * gc / total if total else 0.0, cpu_ms=scratch.cpu_ms,
        note=f"py-spy record --native at {PROFILE_RATE} Hz over {plan.profile_writes} more "
             f"writes with {plan.steps[-1]:,} watchers open, after the measured ones (py-spy "
             f"pauses the agent to sample: not in the latency figures); {total:,} busy "
             f"samples ({idle:,} more in epoll_wait left out); agent CPU per write meanwhile "
             f"median {statistics.median(scratch.cpu_ms):.0f} ms, costliest "
             f"{max(scratch.cpu_ms):.0f} ms; {statistics.fmean(scratch.woken):,.0f} watchers "
             f"woken per write. **The cyclic garbage collector (`gc_collect_main`) is on "
             f"{100 * gc / total if total else 0:.0f} % of the busy samples.**")


def _python_frames(raw: str) -> str:
    """Stacks with their Python frames only, for the function table (uvloop's and
    libuv's C frames wrap nearly every stack and say nothing)."""
    out = []
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if ".py:" in f]
        out.append(f"{';'.join(frames) or 'uvloop / libuv (C)'} {count}")
    return "\n".join(out)


def run_variant(plan: Plan, variant: str, work: Path, profile: bool = False,
                python: str = sys.executable) -> tuple[Outcome, Profile | None]:
    """A fresh agent, the services, then watchers step by step, then the writes (and
    a profile over more writes if asked)."""
    mode = VARIANTS[variant][0]
    work.mkdir(parents=True)
    outcome = Outcome()
    profiled: Profile | None = None
    agent = Agent(python, ADDRESS, work, plan.agent_cpus or set())
    clients: list[WatcherClient] = []
    try:
        agent.wait_ready()
        pid = agent.group.popen.pid  # taskset execs the agent: same process
        outcome.nofile = nofile_limit(pid)
        for number in range(plan.services):  # one instance each, the leader; instance ids
            name = plan.service(number)     # are global in the registry: one per service
            agent.api("PUT", f"/v1/discover/services/{name}/instances/base-{name}",
                      {"addr": f"127.0.0.1:{10000 + number}", "ttl": INSTANCE_TTL})
        clients = [WatcherClient(k, mode, agent.http_port, work, plan.client_cpus)
                   for k in range(plan.clients)]
        settle(pid)
        outcome.rss[0], outcome.fds[0] = rss_mib(pid), open_files(pid)
        have = 0
        for step in plan.steps:
            started = mono()
            _open_step(plan, clients, have, step, outcome)
            opened = mono() - started
            have = step
            if not settle(pid):
                raise PeerError(f"the agent did not go idle with {step:,} watchers open")
            outcome.rss[step], outcome.fds[step] = rss_mib(pid), open_files(pid)
            print(f"    {variant:<16} {step:>6,} watchers: RSS {outcome.rss[step]:7.1f} MiB, "
                  f"{outcome.fds[step]:,} fds (opened in {opened:.1f} s)", flush=True)
        per_service = {n: sum(1 for k in range(have) if k % plan.services == n)
                       for n in range(plan.services)}
        started = mono()
        outcome.log_offset = (work / "agent.log").stat().st_size
        for write in range(plan.writes_of(variant)):
            _write(plan, agent, clients, pid, write, per_service, outcome)
        print(f"    {variant:<16} {plan.writes_of(variant)} writes in {mono() - started:.1f} s",
              flush=True)
        if profile:
            profiled = _profile(plan, agent, clients, pid, per_service, work / "profile.txt")
        answers = ask_all(clients, [{"op": "drain"}] * len(clients))
        events: dict[str, int] = {}
        for answer in answers:
            for kind, count in answer["events"].items():
                events[kind] = events.get(kind, 0) + count
        outcome.counters = {
            "timeouts": sum(a["timeouts"] for a in answers),
            "errors": sum(a["errors"] for a in answers),
            "error_samples": [s for a in answers for s in a["error_samples"]][:3],
            "open_at_end": sum(a["open"] for a in answers), "events": events}
        agent.group.check_alive()
    finally:
        for client in clients:
            client.stop()
        agent.stop()
    return outcome, profiled


def gc_trace(plan: Plan, work: Path) -> GcTrace:
    """One more long-poll run, on an agent started through bench/watchers_gctrace.py:
    how long each cyclic-GC collection stopped its loop during the writes."""
    work.mkdir(parents=True)
    wrapper = work / "python-gctrace"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                       f"{shlex.quote(str(ROOT / 'bench' / 'watchers_gctrace.py'))} \"$@\"\n")
    wrapper.chmod(0o755)
    traced = dataclasses.replace(plan, writes=plan.gc_trace_writes)
    outcome, _ = run_variant(traced, "long-poll", work / "run", python=str(wrapper))
    with open(work / "run" / "agent.log", "rb") as log:
        log.seek(outcome.log_offset)
        text = log.read().decode(errors="replace")
    collections: dict[int, list[float]] = {}
    in_write = [0.0] * len(outcome.windows)
    for found in re.finditer(r"gc-trace generation=(\d) ms=([\d.]+) at=([\d.]+)", text):
        took, at = float(found.group(2)), float(found.group(3))
        collections.setdefault(int(found.group(1)), []).append(took)
        for i, (start, end) in enumerate(outcome.windows):
            if start <= at <= end:
                in_write[i] += took
    return GcTrace(collections, outcome.cpu_ms, outcome.last_ms, in_write)


# -- numbers -------------------------------------------------------------------------------


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def slope(points: dict[int, float]) -> float:
    """Least-squares slope of MiB against watchers, over the points with watchers open
    (the first requests' one-time allocations stay out of it)."""
    xs = [x for x in points if x > 0]
    if len(xs) < 2:
        xs = list(points)
    mean_x = statistics.fmean(xs)
    mean_y = statistics.fmean(points[x] for x in xs)
    num = sum((x - mean_x) * (points[x] - mean_y) for x in xs)
    den = sum((x - mean_x) ** 2 for x in xs)
    return num / den if den else 0.0


def samples(outcome: Outcome, steps: Sequence[int]) -> dict[str, dict[str, float]]:
    top = steps[-1]
    memory = {KIB_SLOPE.key: 1024 * slope(outcome.rss),
              KIB_AVG.key: 1024 * (outcome.rss[top] - outcome.rss[0]) / top}
    memory.update({rss_key(n): outcome.rss[n] for n in outcome.rss})
    missed = [e - o for e, o in zip(outcome.own_expected, outcome.own, strict=True)]
    wakes = {WOKEN.key: statistics.fmean(outcome.woken), OWN.key: statistics.fmean(outcome.own),
             OTHERS.key: statistics.fmean(w - o for w, o in zip(outcome.woken, outcome.own,
                                                                strict=True)),
             MISSED.key: float(sum(missed)), WOKEN_MAX.key: float(max(outcome.woken)),
             CPU_PER_WRITE.key: statistics.fmean(outcome.cpu_ms),
             CPU_PER_WAKE.key: 1e3 * sum(outcome.cpu_ms) / max(1, sum(outcome.woken)),
             CPU_MAX.key: max(outcome.cpu_ms)}
    lat = outcome.latencies_ms
    latency = {PUT.key: statistics.median(outcome.put_ms),
               LAST.key: statistics.median(outcome.last_ms)}
    if outcome.other_pct:
        latency[OTHER.key] = statistics.fmean(outcome.other_pct)
    if lat:
        latency |= {P50.key: percentile(lat, 0.5), P99.key: percentile(lat, 0.99),
                    P99_SENT.key: percentile(outcome.sent_ms, 0.99),
                    MAX.key: max(lat), EARLY.key: 100 * sum(1 for v in lat if v < 0) / len(lat)}
    return {"memory": memory, "wakes": wakes, "latency": latency}


# -- the report ----------------------------------------------------------------------------


@dataclass
class Run:
    results: report.Results = field(default_factory=dict)
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)
    gc: GcTrace | None = None


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def targets(plan: Plan, run: Run) -> list[tuple[str, str]]:
    top = plan.steps[-1]
    per_service = top // plan.services
    rows = []
    for name in plan.variants:
        outcomes = run.outcomes[name]
        cell = run.results["memory"][name]
        held = [max(o.rss) for o in outcomes if o.rss]
        errors = sum(o.counters.get("errors", 0) for o in outcomes)
        ok = len(cell.samples) == plan.reps and all(h == top for h in held) and not errors
        rows.append((f"{top:,} concurrent watchers on one agent ({name})",
                     f"{min(held, default=0):,} held in {len(held)}/{plan.reps} repetitions, "
                     f"{errors} errors: {_verdict(ok)}" if name != BASELINE else
                     f"{min(held, default=0):,} held, {errors} errors (baseline)"))
    for name in plan.variants:
        cell = run.results["wakes"][name]
        woken = cell.values(WOKEN_MAX.key)
        others = cell.values(OTHERS.key)
        missed = cell.values(MISSED.key)
        if not woken:
            rows.append((f"a write wakes only its service's watchers ({name})", "— (no result)"))
            continue
        exact = max(others) == 0 and max(missed) == 0
        text = (f"{cell.median(WOKEN.key):,.0f} woken per write (most in one write "
                f"{max(woken):,.0f}; {per_service:,} watch the written service); other "
                f"services' watchers woken: {max(others):,.0f}, missed: {max(missed):,.0f}")
        rows.append((f"a write wakes only its service's watchers ({name})",
                     text + (f": {_verdict(exact)}" if name != BASELINE else " (baseline)")))
    for name in plan.variants:
        mem, lat = run.results["memory"][name], run.results["latency"][name]
        kib, p99 = mem.median(KIB_SLOPE.key), lat.median(P99.key)
        rows.append((f"memory per watcher, wake-up p99 ({name})",
                     "— (no result)" if kib is None or p99 is None else
                     f"{kib:.1f} KiB per watcher; p99 {p99:.1f} ms (the issue sets no bound: "
                     "measured and compared with the baseline)"))
    return rows


def _machine() -> list[tuple[str, str]]:
    model = cpu_model()
    packages = ", ".join(f"{name} {importlib.metadata.version(name)}"
                         for name in ("aiohttp", "uvloop", "consulate"))
    mem = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")),
               "?")
    return [("cores", f"{os.cpu_count()} x {model}"), ("memory", mem),
            ("kernel (uname -r)", platform.release()),
            ("python", f"{platform.python_version()}; {packages}")]


def _conditions(plan: Plan, args: argparse.Namespace, run: Run,
                elapsed: float) -> list[tuple[str, str]]:
    top = plan.steps[-1]
    nofile = sorted({o.nofile for outcomes in run.outcomes.values() for o in outcomes})
    pinning = (f"the agent (all threads) on CPU {min(AGENT_CPUS)} from its start (taskset); "
               f"the {plan.clients} watcher clients and the writer on CPU {min(CLIENT_CPUS)}"
               if plan.pin else "not applied (--no-pin, or CPUs 0 and 1 are not both usable)")
    return [
        ("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")),
        ("command", " ".join(["python -m bench.watchers", *sys.argv[1:]])),
        ("repetitions", f"{plan.reps}; the kinds of watcher take turns within each repetition "
                        "(order rotated by one per repetition), each on a fresh agent "
                        "(`consulate agent --no-iptables`, empty data dir)"),
        ("services", f"{plan.services} services w000.., one instance each registered before "
                     f"any watcher (Discoverd PUT, ttl {INSTANCE_TTL}); watchers spread evenly "
                     f"({top // plan.services:,} per service at {top:,}), each service's "
                     f"watchers over all {plan.clients} client processes"),
        ("watchers", "bench/watchers_client.py: asyncio protocols on uvloop, one TCP "
                     "connection per watcher to 127.0.0.1, at most 32 being set up at once "
                     "per client; a long poll first GETs the index, then blocks with "
                     "`?index=N&wait=10m` on the same keep-alive connection and blocks "
                     "again after each answer; a stream is in place once `current` arrived"),
        ("memory", f"VmRSS of the agent from /proc/PID/status once it is idle (at most "
                   f"{1e3 * QUIET_CPU:g} ms of loop CPU per {SETTLE_WINDOW:g} s) with 0, "
                   f"{_counts(plan.steps)} watchers open; per watcher = least-squares slope "
                   "over the points with watchers open (the 0 point holds one-time costs of "
                   "the first requests); kernel socket buffers are not in RSS"),
        ("writes", f"{plan.writes} per kind and repetition ({plan.baseline_writes} for the "
                   f"baseline, whose writes each wake every watcher and cost the agent seconds "
                   f"of CPU), each `PUT /v1/discover/services/"
                   f"<s>/instances/bench-N` (a new instance of one service, services in turn) "
                   f"once the agent is idle; then wait until every watcher of that service woke "
                   f"and nobody else wakes over {SETTLE_WINDOW:g} s with the agent idle (or "
                   f"{WAKE_TIMEOUT:.0f} s)"),
        ("wake-up", "a long poll that answers with a higher index, or an `up` event on a "
                    "stream; latency = the watcher's CLOCK_MONOTONIC stamp in data_received "
                    "of the bytes that complete it minus the writer's stamp when the PUT "
                    "returned (same machine, system-wide clock); p50/p99/max over the written "
                    "service's watchers of all writes of a repetition"),
        ("agent CPU per write", "CPU time of the agent's event-loop thread (/proc/PID/"
                                "schedstat, ns resolution) from before the PUT until nobody "
                                "wakes any more; other load = the agent core's busy time "
                                "(/proc/stat) minus the agent's over the same window"),
        ("profile", f"last repetition, {' and '.join(PROFILED)}: py-spy record --native on the "
                    f"agent over {plan.profile_writes} more writes after the measured ones "
                    "(they are not in the tables: py-spy pauses the agent for each sample); "
                    "samples waiting in epoll are left out" if plan.profile_writes else "none"),
        ("GC trace", f"after the repetitions: one more long-poll run with {plan.gc_trace_writes} "
                     "writes on an agent started through bench/watchers_gctrace.py, which "
                     "logs every cyclic-GC collection of at least 1 ms (not in the tables)"
                     if plan.gc_trace_writes else "none"),
        ("descriptors", f"RLIMIT_NOFILE {args.nofile} in the benchmark, inherited by the "
                        f"agent (its /proc/PID/limits: {', '.join(nofile)}) and the clients"),
        ("pinning", pinning),
        ("total runtime", f"{elapsed / 60:.1f} min"),
    ]


def _rss_table(plan: Plan, run: Run) -> str:
    counts = [0, *plan.steps]
    lines = ["| variant | " + " | ".join(f"RSS at {n:,} watchers (MiB) min / **median** / max"
                                          for n in counts) + " | agent fds at "
             f"{plan.steps[-1]:,} |", "|---|" + "---|" * (len(counts) + 1)]
    for name in plan.variants:
        cell = run.results["memory"][name]
        row = [name]
        for n in counts:
            values = cell.values(rss_key(n))
            row.append(f"{min(values):.1f} / **{statistics.median(values):.1f}** / "
                       f"{max(values):.1f}" if values else "—")
        fds = [o.fds[plan.steps[-1]] for o in run.outcomes[name] if plan.steps[-1] in o.fds]
        row.append(f"{statistics.median(fds):,.0f}" if fds else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _counters(plan: Plan, run: Run) -> str:
    lines = ["| variant | long polls that timed out | connection errors | other stream "
             "events | watchers open at the end (median) |", "|---|---|---|---|---|"]
    for name in plan.variants:
        outcomes = [o for o in run.outcomes[name] if o.counters]
        if not outcomes:
            lines.append(f"| {name} | — | — | — | — |")
            continue
        events: dict[str, int] = {}
        for o in outcomes:
            for kind, count in o.counters["events"].items():
                events[kind] = events.get(kind, 0) + count
        errors = sum(o.counters["errors"] for o in outcomes)
        samples_ = [s for o in outcomes for s in o.counters["error_samples"]]
        lines.append(f"| {name} | {sum(o.counters['timeouts'] for o in outcomes)} | {errors}"
                     + (f" (e.g. {report._escape(samples_[0])})" if samples_ else "")
                     + f" | {', '.join(f'{k}: {v}' for k, v in sorted(events.items())) or '0'}"
                     f" | {statistics.median(o.counters['open_at_end'] for o in outcomes):,.0f}"
                     " |")
    return "\n".join(lines) + "\n"


def _profile_tables(profiled: Profile) -> str:
    out = [profiled.note + "\n"]
    if profiled.functions:
        out.append("\n| function, samples outside the GC (on the stack in) | % of them "
                   "| % on top |\n|---|---|---|\n")
        out += [f"| `{report._escape(f)}` | {inc:.1f} | {own:.1f} |\n"
                for f, inc, own in profiled.functions]
    if profiled.lines:
        out.append("\n| innermost frame, all busy samples | % of them | code |\n"
                   "|---|---|---|\n")
        out += [f"| `{report._escape(f)}` | {pct:.1f} | `{report._escape(code)}` |\n"
                for f, pct, code in profiled.lines]
    return "".join(out)


_COLOURS = {"long-poll": "#1f77b4", "sse": "#2ca02c", BASELINE: "#ff7f0e"}


def memory_chart(plan: Plan, run: Run, path: Path) -> None:
    """RSS against watchers open: median line, min-max band, one line per variant."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    counts = [0, *plan.steps]
    for name in plan.variants:
        cell = run.results["memory"][name]
        xs = [n for n in counts if cell.values(rss_key(n))]
        if not xs:
            continue
        mid = [statistics.median(cell.values(rss_key(n))) for n in xs]
        low = [min(cell.values(rss_key(n))) for n in xs]
        high = [max(cell.values(rss_key(n))) for n in xs]
        kib = cell.median(KIB_SLOPE.key)
        ax.plot(xs, mid, marker="o", color=_COLOURS.get(name, "#9467bd"),
                label=f"{name}: {kib:.1f} KiB per watcher" if kib is not None else name)
        ax.fill_between(xs, low, high, color=_COLOURS.get(name, "#9467bd"), alpha=0.2)
    ax.set_xlabel("watchers open")
    ax.set_ylabel("agent RSS (MiB)")
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=9)
    ax.set_title(f"Agent RSS against watchers open ({plan.services} services)\n"
                 f"line: median of {plan.reps}, band: min-max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heavy(cpu_ms: Sequence[float]) -> list[int]:
    """Indexes of the writes whose loop CPU was well above the median write's."""
    if not cpu_ms:
        return []
    typical = statistics.median(cpu_ms)
    return [i for i, v in enumerate(cpu_ms) if v > HEAVY * typical]


def per_rep_table(plan: Plan, run: Run) -> str:
    """Each repetition on its own: the tail against extra loop work and other load."""
    lines = ["| variant | repetition | p50 (ms) | p99 (ms) | max (ms) | last wake-up per write, "
             "median / max (ms) | loop CPU per write, median / max (ms) | writes with "
             f"> {HEAVY:g}x the median loop CPU | other load on the agent's core (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in plan.variants:
        for rep, outcome in enumerate(run.outcomes[name], 1):
            lat = outcome.latencies_ms
            if not lat:
                continue
            other = (f"{statistics.fmean(outcome.other_pct):.0f}" if outcome.other_pct
                     else "—")
            lines.append(
                f"| {name} | {rep} | {percentile(lat, 0.5):,.1f} | {percentile(lat, 0.99):,.1f} "
                f"| {max(lat):,.1f} | {statistics.median(outcome.last_ms):,.1f} / "
                f"{max(outcome.last_ms):,.1f} | {statistics.median(outcome.cpu_ms):,.1f} / "
                f"{max(outcome.cpu_ms):,.1f} | {len(_heavy(outcome.cpu_ms))} of "
                f"{len(outcome.cpu_ms)} | {other} |")
    return "\n".join(lines) + "\n"


def _gc_split(trace: GcTrace) -> tuple[list[float], list[float]]:
    """GC time within the writes with extra loop CPU, and within the others."""
    heavy = _heavy(trace.cpu_ms)
    return ([trace.gc_ms[i] for i in heavy],
            [v for i, v in enumerate(trace.gc_ms) if i not in heavy])


def gc_table(plan: Plan, trace: GcTrace) -> str:
    heavy = _heavy(trace.cpu_ms)
    in_heavy, in_light = _gc_split(trace)
    lines = [f"Long polls, {plan.steps[-1]:,} watchers, {len(trace.cpu_ms)} writes on an agent "
             "started through bench/watchers_gctrace.py (a `gc.callbacks` hook that logs each "
             f"collection of at least 1 ms; not in the tables above). Loop CPU per write: "
             f"median {statistics.median(trace.cpu_ms):,.1f} ms, max "
             f"{max(trace.cpu_ms):,.1f} ms; {len(heavy)} writes above {HEAVY:g}x the median; "
             f"last wake-up per write: median {statistics.median(trace.last_ms):,.1f} ms, max "
             f"{max(trace.last_ms):,.1f} ms. Collections (of >= 1 ms) within a write: "
             + (f"median {statistics.median(in_heavy):,.1f} ms in those {len(heavy)} writes"
                if in_heavy else "no write with extra CPU")
             + (f", {statistics.median(in_light):,.1f} ms in the others.\n" if in_light
                else ".\n"),
             "| generation | collections of >= 1 ms during the writes | median (ms) | max (ms) "
             "| total (ms) |", "|---|---|---|---|---|"]
    for generation in (0, 1, 2):
        took = trace.collections.get(generation, [])
        lines.append(f"| {generation} | {len(took)} | "
                     + (f"{statistics.median(took):,.1f} | {max(took):,.1f} | {sum(took):,.0f} |"
                        if took else "— | — | 0 |"))
    return "\n".join(lines) + "\n"


def bounds(plan: Plan, run: Run) -> list[str]:
    """What sets each figure, from this run's numbers (profiles and GC trace included)."""
    out = []
    mem = run.results["memory"]
    kib = {n: mem[n].median(KIB_SLOPE.key) for n in plan.variants}
    if kib and all(v is not None for v in kib.values()):
        out.append(
            "Memory: RSS grows linearly with the watchers ("
            + ", ".join(f"{n} {v:.1f} KiB" for n, v in kib.items() if v is not None)
            + " each). The baseline keeps no per-service hub state and costs about as much "
            "per watcher: the cost is the HTTP connection the agent holds per watcher (aiohttp's "
            "protocol, parser and buffers, the request and its handler task), not the hub's "
            "waiter or queue; kernel socket memory comes on top and is not in RSS.")
    for name in plan.variants:
        wakes, lat = run.results["wakes"][name], run.results["latency"][name]
        per_wake, p50, p99 = (wakes.median(CPU_PER_WAKE.key), lat.median(P50.key),
                              lat.median(P99.key))
        woken = wakes.median(WOKEN.key)
        outcomes = run.outcomes[name]
        if per_wake is None or p50 is None or p99 is None or woken is None or not outcomes:
            continue
        last = statistics.median(v for o in outcomes for v in o.last_ms)
        text = (f"{name}: a write wakes {woken:,.0f} watchers and the agent answers them one "
                f"after another on its single event loop, about {per_wake:,.0f} µs of loop CPU "
                f"per woken watcher (the write's loop CPU over the watchers it woke: the answer "
                f"or event, for a long poll the next request it sends at once, and a share "
                f"of the PUT itself); the last one has its answer {last:,.1f} ms after the "
                f"PUT returned (median over the writes), so the written service's watchers "
                f"wait p50 {p50:,.1f} ms.")
        heavy = [(o.last_ms[i], o.cpu_ms[i]) for o in outcomes for i in _heavy(o.cpu_ms)]
        writes = sum(len(o.cpu_ms) for o in outcomes)
        reps = "; ".join(
            f"p99 {percentile(o.latencies_ms, 0.99):,.1f} ms with "
            + (f"{statistics.fmean(o.other_pct):.0f} %" if o.other_pct else "? %")
            for o in outcomes if o.latencies_ms)
        if name != BASELINE and heavy:
            light = [v for o in outcomes for i, v in enumerate(o.last_ms)
                     if i not in _heavy(o.cpu_ms)]
            heavy_last = statistics.median(v for v, _ in heavy)
            light_last = statistics.median(light) if light else 0.0
            text += (f" {len(heavy)} of {writes} writes took over {HEAVY:g}x the median loop "
                     f"CPU (up to {max(c for _, c in heavy):,.0f} ms); their last wake-up came "
                     f"at median {heavy_last:,.1f} ms against {light_last:,.1f} ms for the "
                     "others")
            text += (f": the tail (p99 {p99:,.1f} ms) comes mostly from them."
                     if heavy_last > 1.5 * light_last else
                     f", so they explain only part of the tail (p99 {p99:,.1f} ms): the rest "
                     f"follows the other processes' load on the agent's core, by repetition: "
                     f"{reps} other load.")
        elif name != BASELINE:
            text += (f" No write took over {HEAVY:g}x the median loop CPU: the tail (p99 "
                     f"{p99:,.1f} ms) follows the other processes' load on the agent's core, by "
                     f"repetition: {reps} other load.")
        split = _gc_split(run.gc) if run.gc is not None and name == "long-poll" else None
        if split is not None and split[0] and split[1]:
            in_heavy, in_light = statistics.median(split[0]), statistics.median(split[1])
            text += (f" In the GC trace's run, the writes with extra loop CPU held "
                     f"{in_heavy:,.1f} ms of garbage collection each (median), the others "
                     f"{in_light:,.1f} ms"
                     + (": the extra work is the cyclic GC." if in_heavy > max(1.0, 2 * in_light)
                        else "."))
        full = run.gc.collections.get(2, []) if run.gc is not None else []
        measured_max = max((v for o in outcomes for v in o.cpu_ms), default=0.0)
        if name == "long-poll" and full and measured_max < min(full):
            text += (f" No measured write met a full collection (the costliest took "
                     f"{measured_max:,.0f} ms of loop CPU); the longer series of the profile "
                     f"and the GC trace did, {len(full)} in {len(run.gc.cpu_ms) if run.gc else 0}"
                     f" writes of the trace, of {min(full):,.0f}-{max(full):,.0f} ms: over a "
                     "long run a write now and then waits that long, which a p99 over 20 "
                     "writes per repetition does not show.")
        profiled = run.profiles.get(name)
        if profiled is not None and profiled.cpu_ms:
            text += (f" Profile: the cyclic garbage collector is on {profiled.gc_pct:.0f} % of "
                     f"the agent's busy samples over {len(profiled.cpu_ms)} more writes; the "
                     f"costliest of them took {max(profiled.cpu_ms):,.0f} ms of loop CPU "
                     f"(median {statistics.median(profiled.cpu_ms):,.0f} ms).")
        out.append(text)
    trace = run.gc
    if trace is not None and trace.collections:
        old = trace.collections.get(2, [])
        young = trace.collections.get(1, [])
        text = (f"The cyclic GC (trace below): over {len(trace.cpu_ms)} long-poll writes with "
                f"{plan.steps[-1]:,} watchers open it stopped the loop for {len(young)} "
                "generation-1 collection(s) of 1 ms or more"
                + (f" (median {statistics.median(young):,.1f} ms)" if young else "")
                + f" and {len(old)} full one(s)"
                + (f" ({', '.join(f'{v:,.0f}' for v in sorted(old))} ms)" if old else "")
                + ".")
        if old:
            text += (" A full collection walks every object of every open watcher while the "
                     "loop stands still. CPython 3.11 runs one once the objects that survived "
                     "into the oldest generation since the last one exceed 25 % of it, and "
                     "every answered long poll leaves a new request, handler task and waiter "
                     "behind that live until the next write of their service: full "
                     "collections keep coming as long as long polls cycle, each as long as "
                     "the watchers are many.")
        out.append(text)
    base = run.results["wakes"].get(BASELINE)
    for name in PROFILED:
        if base is None or name not in run.results["wakes"]:
            continue
        hub_cpu, base_cpu = (run.results["wakes"][name].median(CPU_PER_WRITE.key),
                             base.median(CPU_PER_WRITE.key))
        hub_p50, base_p50 = (run.results["latency"][name].median(P50.key),
                             run.results["latency"][BASELINE].median(P50.key))
        if hub_cpu and base_cpu and hub_p50 and base_p50:
            out.append(f"{name} against {BASELINE}: {base_cpu / hub_cpu:,.0f}x less loop CPU "
                       f"per write and a {base_p50 / hub_p50:,.0f}x lower p50: the saving is "
                       "in not waking the watchers of other services, not in a cheaper "
                       "wake-up (compare the CPU per woken watcher).")
    return out


def write_report(plan: Plan, args: argparse.Namespace, run: Run, elapsed: float) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    memory, wakes, latency = _sections(plan.steps)
    variants = plan.variants
    text = ["# Watchers benchmark: 10,000 long polls and event streams on one agent\n"]
    for heading, rows in [("Targets (issue 5, point 7)", targets(plan, run)),
                          ("Machine", _machine()),
                          ("Conditions", _conditions(plan, args, run, elapsed)),
                          ("Variants", [(n, VARIANTS[n][1]) for n in variants])]:
        text.append(f"\n## {heading}\n\n| | |\n|---|---|\n")
        text += [f"| {report._escape(k)} | {report._escape(v)} |\n" for k, v in rows]
    text.append(f"\n## {memory.title}\n\n")
    text.append(report.table(memory, run.results["memory"], variants, plan.reps))
    text.append("\n" + _rss_table(plan, run))
    text.append(f"\n![{memory.title}]({memory.chart})\n")
    for section in (wakes, latency):
        text.append(f"\n## {section.title}\n\n")
        text.append(report.table(section, run.results[section.key], variants, plan.reps))
        text.append(f"\n![{section.title}]({section.chart})\n")
        report.chart(section, run.results[section.key], variants, out / section.chart)
    text.append("\n## Watcher counters (all repetitions)\n\n" + _counters(plan, run))
    text.append("\n## Each repetition\n\n" + per_rep_table(plan, run))
    text.append("\n## What bounds the numbers\n\n"
                + "".join(f"- {line}\n" for line in bounds(plan, run)))
    if run.gc is not None:
        text.append("\n## The cyclic GC's pauses (a separate traced run)\n\n"
                    + gc_table(plan, run.gc))
    for name, profiled in run.profiles.items():
        text.append(f"\n## Where the agent's CPU goes on a write: {name} (py-spy)\n\n"
                    + _profile_tables(profiled))
    (out / "watchers.md").write_text("".join(text))
    memory_chart(plan, run, out / memory.chart)
    raw = {"results": report.results_json(run.results),
           "outcomes": {name: [{k: v for k, v in dataclasses.asdict(o).items()
                                if k not in ("latencies_ms", "sent_ms")} for o in outcomes]
                        for name, outcomes in run.outcomes.items()}}
    (out / "watchers.json").write_text(json.dumps(raw, indent=1) + "\n")


# -- main ----------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.watchers",
        description="Memory per watcher, wake-up selectivity and latency of consulate's "
                    "long polls and event streams, against Consul-style blocking queries.")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--steps", default="1000,5000,10000",
                        help="watchers open at each RSS reading, increasing; the last is where "
                             "the writes happen (default 1000,5000,10000)")
    parser.add_argument("--services", type=int, default=100,
                        help="services the watchers spread over (default 100)")
    parser.add_argument("--writes", type=int, default=20,
                        help="writes per kind and repetition (default 20)")
    parser.add_argument("--baseline-writes", type=int, default=10,
                        help=f"writes per repetition for {BASELINE}: each wakes every watcher "
                             "and costs the agent ~2-3 s of CPU at 10,000 (default 10)")
    parser.add_argument("--clients", type=int, default=4,
                        help="watcher client processes (default 4)")
    parser.add_argument("--profile-writes", type=int, default=30,
                        help="writes under py-spy after the measured ones, last repetition, "
                             f"{' and '.join(PROFILED)} (default 30)")
    parser.add_argument("--no-profile", action="store_true", help="no py-spy profile")
    parser.add_argument("--gc-trace-writes", type=int, default=40,
                        help="writes of one more long-poll run whose agent logs each cyclic-GC "
                             "collection (bench/watchers_gctrace.py), not in the results; "
                             "0: none (default 40)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 1 repetition, steps 100,500,1000, 5 writes, "
                             "10 profiled and 10 traced writes")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"directory for watchers.md, PNGs, watchers.json (default {RESULTS})")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the agent and the clients to separate cores")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.steps, args.writes, args.baseline_writes = 1, "100,500,1000", 5, 5
        args.profile_writes, args.gc_trace_writes = 10, 10
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"--variants: use any of {', '.join(VARIANTS)}")
    args.variants = list(dict.fromkeys(names))
    try:
        args.steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--steps {args.steps!r}: whole numbers, comma-separated")
    if (not args.steps or any(b <= a for a, b in zip([0, *args.steps], args.steps, strict=False))
            or args.reps < 1 or args.services < 1 or args.clients < 1 or args.writes < 1
            or args.baseline_writes < 1):
        parser.error("--steps increasing and above 0; --reps, --services, --clients, --writes "
                     "at least 1")
    if max(args.writes, args.baseline_writes) > args.services:
        parser.error("--writes at most --services (each write goes to another service)")
    return args


def _raise_nofile() -> str:
    """Raise RLIMIT_NOFILE for this process and its children; says what it got."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(NOFILE, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
        return f"raised to {want:,} (soft and hard)"
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE: up to the hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return (f"soft limit raised to the hard limit, {hard:,} (raising the hard limit to "
                f"{want:,} was refused: no CAP_SYS_RESOURCE here)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    pin = not args.no_pin and os.sched_getaffinity(0) >= AGENT_CPUS | CLIENT_CPUS
    plan = Plan(args.variants, args.steps, args.services, args.writes, args.baseline_writes,
                args.clients,
                args.reps, pin, 0 if args.no_profile else args.profile_writes,
                args.gc_trace_writes)
    args.nofile = _raise_nofile()
    if pin:
        os.sched_setaffinity(0, CLIENT_CPUS)  # the writer: off the agent's core
    sections = _sections(plan.steps)
    run = Run(results={s.key: {n: report.Cell() for n in plan.variants} for s in sections},
              outcomes={n: [] for n in plan.variants})
    work = Path(tempfile.mkdtemp(prefix="consulate-bench-watchers-"))
    started = time.monotonic()
    print(f"watchers: {_counts(plan.steps)} over {plan.services} services, {plan.reps} "
          f"repetition(s), work in {work}", flush=True)
    for rep in range(plan.reps):
        print(f"repetition {rep + 1}/{plan.reps}", flush=True)
        turn = rep % len(plan.variants)
        for name in plan.variants[turn:] + plan.variants[:turn]:
            profile = bool(plan.profile_writes) and rep == plan.reps - 1 and name in PROFILED
            try:
                outcome, profiled = run_variant(plan, name, work / f"{name}-{rep + 1}", profile)
            except (PeerError, OSError, ValueError) as exc:
                reason = f"rep {rep + 1}: {exc}"[:300]
                print(f"    {name:<16} FAILED: {reason}", flush=True)
                for cells in run.results.values():
                    cells[name].errors.append(reason)
                continue
            run.outcomes[name].append(outcome)
            if profiled is not None:
                run.profiles[name] = profiled
            for key, sample in samples(outcome, plan.steps).items():
                run.results[key][name].samples.append(sample)
            lat = run.results["latency"][name].samples[-1]
            print(f"    {name:<16} {plan.steps[-1]:,} watchers: "
                  f"{statistics.fmean(outcome.woken):,.0f} woken per write "
                  f"({statistics.fmean(outcome.own):,.0f} of the written service); "
                  f"p50 {lat.get(P50.key, float('nan')):.1f} ms, "
                  f"p99 {lat.get(P99.key, float('nan')):.1f} ms; "
                  f"{1024 * slope(outcome.rss):.1f} KiB per watcher", flush=True)
    if plan.gc_trace_writes and "long-poll" in plan.variants:
        print(f"GC trace: long-poll, {plan.steps[-1]:,} watchers, {plan.gc_trace_writes} writes, "
              "agent started through bench/watchers_gctrace.py", flush=True)
        try:
            run.gc = gc_trace(plan, work / "gc-trace")
        except (PeerError, OSError, ValueError) as exc:
            print(f"    GC trace FAILED: {exc}", flush=True)
    elapsed = time.monotonic() - started
    write_report(plan, args, run, elapsed)
    failed = any(cell.errors for cell in run.results["memory"].values())
    if failed:
        print(f"some repetitions failed: logs kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"done in {elapsed / 60:.1f} min: {args.out / 'watchers.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
