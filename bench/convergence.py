"""Route convergence across 3 hosts: registry change -> every agent's route table (issue 7).

A 3-host lab, one ``consulate agent`` per host, the registry shared by all three.
Each sample registers (or, the next one, deregisters) one instance of service
``bench`` through h2's agent API, and measures on h1, h2 and h3 how long until
that agent's route table (``GET /v1/agent/routes``) shows the change. Target
(issue 7): p99 under 200 ms with etcd.

All lab namespaces share the machine's clock, so every timestamp is ``time.time()``
taken by a small process inside a host namespace:

* the writer, in h2, keeps one HTTP connection to h2's agent and stamps the time
  right before each PUT;
* an observer per host keeps one HTTP connection to its own agent and, once
  armed for a sample, polls its route table every ~2 ms until the change shows
  (idle between samples, so that polling does not load the agents meanwhile);
* the peer, the floor any etcd client can reach: a raw etcd watch (aetcd) on
  the instance key prefix from each host, against its local member, stamping
  each event as it arrives.

Layouts: ``etcd``, a 3-member etcd cluster, one member per host, every agent on
``--registry etcd://h1,h2,h3``; ``join``, the embedded registry in h1's agent with
h2's and h3's agents ``--join``-ed to it (a token, since h1 then listens off
loopback). The raw watch is the same run's etcd one. Writes
``results/convergence.md``, ``.json`` and ``.png``.

    python -m bench.convergence [--samples 100] [--layouts etcd,join]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `consulate` importable the same way
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_model
from bench.report import colour, markdown
from bench.signals import run_main
from bench.watchers import percentile
from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent
from consulate.control.labetcd import lab_cluster

RESULTS = Path(__file__).resolve().parent / "results"
HOSTS = (1, 2, 3)
WRITER_HOST = 2
SERVICE = "bench"
TARGET_P99_MS = 200.0
POLL_INTERVAL = 0.002  # the observers' route table polls while armed
SAMPLE_TIMEOUT = 10.0  # seconds for a change to show everywhere
PAUSE = (0.05, 0.15)  # seconds between samples, random: no lock-step with any timer
TOKEN = "bench-convergence-token"
ETCD_PREFIX = "/consulate/instances/"  # the agents' etcd layout (control/registry/etcd.py)
LAYOUTS = ("etcd", "join")

# In a host: armed by {"id": ..., "present": bool}, polls the local agent's route table
# until service bench has (or no longer has) that endpoint; prints when it saw it.
OBSERVER = """
import http.client, json, sys, time
service, token, interval, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
headers = {"X-Consul-Token": token} if token else {}
conn = http.client.HTTPConnection("127.0.0.1", 8500, timeout=5)
def ids():
    conn.request("GET", "/v1/agent/routes", headers=headers)
    answer = conn.getresponse()
    body = answer.read()
    if answer.status != 200:
        raise SystemExit(f"GET /v1/agent/routes: {answer.status} {body[:200]!r}")
    return {e["ID"] for r in json.loads(body) if r["Service"] == service for e in r["Endpoints"]}
ids()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    want = json.loads(line)
    polls, deadline = 1, time.time() + timeout
    seen = (want["id"] in ids()) == want["present"]
    print(json.dumps({"armed": True, "already": seen}), flush=True)
    while not seen and time.time() < deadline:
        time.sleep(interval)
        polls += 1
        seen = (want["id"] in ids()) == want["present"]
    print(json.dumps({"t": time.time() if seen else None, "polls": polls}), flush=True)
"""

# In the writer's host: one PUT per line, stamped right before it is sent.
WRITER = """
import http.client, json, sys, time
token = sys.argv[1]
headers = {"X-Consul-Token": token} if token else {}
conn = http.client.HTTPConnection("127.0.0.1", 8500, timeout=10)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    call = json.loads(line)
    body = json.dumps(call["body"]).encode() if call["body"] is not None else None
    began = time.time()
    conn.request("PUT", call["path"], body=body, headers=headers)
    answer = conn.getresponse()
    text = answer.read()
    print(json.dumps({"t": began, "status": answer.status, "body": text[:200].decode()}),
          flush=True)
"""

# In a host: a raw etcd watch on the instances prefix at the local member; one line
# per event, stamped on arrival.
ETCD_WATCH = """
import asyncio, json, sys, time
import aetcd
async def main():
    client = aetcd.Client(host=sys.argv[1], port=2379)
    watch = await client.watch_prefix(sys.argv[2].encode())
    print(json.dumps({"ready": True}), flush=True)
    async for event in watch:
        print(json.dumps({"t": time.time(), "key": event.kv.key.decode(), "kind": event.kind}),
              flush=True)
asyncio.run(main())
"""


class Child:
    """A helper process in a lab host speaking JSON lines; its stdout read by a thread
    so that several can be waited on without blocking each other."""

    def __init__(self, lab: labmod.Lab, host: int, argv: Sequence[str], what: str) -> None:
        self.what = what
        self.process = lab.popen(f"h{host}", argv, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("ready", 30)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def recv(self, timeout: float) -> dict[str, Any]:
        try:
            message = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.what}: no answer within {timeout:g} s") from None
        if message is None:
            assert self.process.stderr is not None
            raise RuntimeError(f"{self.what} exited: {self.process.stderr.read()[-1000:]}")
        return message

    def expect(self, key: str, timeout: float) -> dict[str, Any]:
        message = self.recv(timeout)
        if key not in message:
            raise RuntimeError(f"{self.what}: expected {key!r}, got {message}")
        return message

    def stop(self) -> None:
        """Close stdin (the scripts end at EOF), then SIGTERM by PID if still there."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(2)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            self.process.wait(5)


@dataclass
class Series:
    """Latencies in ms of one layout: per host, consulate's route table and the raw watch."""

    routes: dict[int, list[float]] = field(default_factory=lambda: {i: [] for i in HOSTS})
    watch: dict[int, list[float]] = field(default_factory=lambda: {i: [] for i in HOSTS})
    put_ms: list[float] = field(default_factory=list)  # the PUT's own round trip (h2)
    polls: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _python_in(lab: labmod.Lab, host: int, script: str, *args: str, what: str) -> Child:
    return Child(lab, host, [sys.executable, "-c", script, *args], what)


@contextmanager
def helpers(lab: labmod.Lab, token: str, with_watch: bool
            ) -> Iterator[tuple[Child, dict[int, Child], dict[int, Child]]]:
    """The writer in h2, an observer per host, and (etcd layout) a raw watch per host."""
    started: list[Child] = []
    try:
        writer = _python_in(lab, WRITER_HOST, WRITER, token, what=f"writer in h{WRITER_HOST}")
        started.append(writer)
        observers, watches = {}, {}
        for i in HOSTS:
            observers[i] = _python_in(lab, i, OBSERVER, SERVICE, token, str(POLL_INTERVAL),
                                      str(SAMPLE_TIMEOUT), what=f"observer in h{i}")
            started.append(observers[i])
            if with_watch:
                watches[i] = _python_in(lab, i, ETCD_WATCH, lab.host_ip(i),
                                        f"{ETCD_PREFIX}{SERVICE}/", what=f"etcd watch in h{i}")
                started.append(watches[i])
        yield writer, observers, watches
    finally:
        for child in started:
            child.stop()


def _put(writer: Child, path: str, body: object) -> dict[str, Any]:
    writer.send({"path": path, "body": body})
    answer = writer.expect("t", SAMPLE_TIMEOUT)
    if answer["status"] != 200:
        raise RuntimeError(f"PUT {path} answered {answer['status']}: {answer['body']}")
    return answer


def _watch_event(watch: Child, key: str, kind: str) -> float:
    """When the raw watch delivered ``kind`` on ``key`` (other events are skipped)."""
    deadline = time.monotonic() + SAMPLE_TIMEOUT
    while True:
        event = watch.recv(max(0.01, deadline - time.monotonic()))
        if event["key"] == key and event["kind"] == kind:
            return float(event["t"])


def measure(lab: labmod.Lab, token: str, samples: int, with_watch: bool) -> Series:
    """``samples`` changes through h2's agent: register bench-N, then deregister it."""
    series = Series()
    began = time.monotonic()
    with helpers(lab, token, with_watch) as (writer, observers, watches):
        # A base instance keeps the service (and its VIP) in place: the samples measure
        # endpoint changes, not VIP allocation. It is written twice: an embedded
        # registry's first write has index 1, the index it already reported while
        # empty, so a joined agent's blocking query (index=1) does not wake for it.
        for port in (9000, 9001):
            _put(writer, "/v1/agent/service/register",
                 {"ID": f"{SERVICE}-base", "Name": SERVICE, "Address": lab.container_ip(2, 1),
                  "Port": port})
        for i in HOSTS:
            observers[i].send({"id": f"{SERVICE}-base", "present": True})
            observers[i].expect("armed", SAMPLE_TIMEOUT)
            if observers[i].expect("t", SAMPLE_TIMEOUT + 5)["t"] is None:
                raise RuntimeError(f"h{i}'s route table never showed {SERVICE}-base")
        for number in range(samples):
            instance = f"{SERVICE}-{number // 2}"
            adding = number % 2 == 0
            time.sleep(random.uniform(*PAUSE))
            for observer in observers.values():
                observer.send({"id": instance, "present": adding})
            for i, observer in observers.items():
                if observer.expect("armed", SAMPLE_TIMEOUT)["already"]:
                    raise RuntimeError(f"h{i} saw {instance} present={adding} before the PUT")
            if adding:
                answer = _put(writer, "/v1/agent/service/register",
                              {"ID": instance, "Name": SERVICE, "Port": 10000 + number,
                               "Address": lab.container_ip(2, 1)})
            else:
                answer = _put(writer, f"/v1/agent/service/deregister/{instance}", None)
            sent = float(answer["t"])
            series.put_ms.append((time.time() - sent) * 1000)
            for i, observer in observers.items():
                seen = observer.expect("t", SAMPLE_TIMEOUT + 5)
                if seen["t"] is None:
                    raise RuntimeError(f"h{i}'s route table did not show {instance} "
                                       f"present={adding} within {SAMPLE_TIMEOUT:g} s")
                series.routes[i].append((seen["t"] - sent) * 1000)
                series.polls.append(int(seen["polls"]))
            key = f"{ETCD_PREFIX}{SERVICE}/{instance}"
            for i, watch in watches.items():
                delivered = _watch_event(watch, key, "PUT" if adding else "DELETE")
                series.watch[i].append((delivered - sent) * 1000)
            if (number + 1) % 20 == 0:
                print(f"  {number + 1}/{samples}: last h1 {series.routes[1][-1]:.1f} ms, "
                      f"h3 {series.routes[3][-1]:.1f} ms", flush=True)
    series.seconds = time.monotonic() - began
    return series


@contextmanager
def etcd_layout(lab: labmod.Lab, work: Path) -> Iterator[str]:
    """A 3-member etcd cluster, one member per host, and an agent per host on it."""
    with ExitStack() as stack:
        registry = stack.enter_context(lab_cluster(lab, work, HOSTS)).registry
        for i in HOSTS:
            agent = LabAgent(lab, i, work / f"etcd-agent-h{i}", work / f"etcd-agent-h{i}.log",
                             extra_args=["--registry", registry])
            stack.callback(agent.stop)
            agent.start()
        yield ""


@contextmanager
def join_layout(lab: labmod.Lab, work: Path) -> Iterator[str]:
    """The embedded registry in h1's agent, h2's and h3's agents joined to it."""
    with ExitStack() as stack:
        for i in HOSTS:
            where = (["--http-addr", "0.0.0.0:8500"] if i == 1
                     else ["--join", f"{lab.host_ip(1)}:8500"])
            agent = LabAgent(lab, i, work / f"join-agent-h{i}", work / f"join-agent-h{i}.log",
                             token=TOKEN, extra_args=where)
            stack.callback(agent.stop)
            agent.start()
        yield TOKEN


# -- the report ----------------------------------------------------------------------------

TITLES = {"etcd": "etcd cluster (3 members, one per host; every agent on all three)",
          "join": "embedded registry in h1's agent, h2 and h3 --join-ed to it"}


def _stats(values: Sequence[float]) -> list[str]:
    return [f"{min(values):.1f}", f"**{statistics.median(values):.1f}**",
            f"{percentile(values, 0.99):.1f}", f"{max(values):.1f}"]


def table(results: dict[str, Series]) -> str:
    """One row per layout and host: consulate and the raw watch, min/median/p99/max."""
    floor = results.get("etcd")
    header = ["layout", "host", "route table min (ms)", "median", "p99", "max",
              "raw etcd watch min (ms)", "median", "p99", "max",
              "median vs raw watch", "p99 vs raw watch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, series in results.items():
        for i in HOSTS:
            routes = series.routes[i]
            watch = floor.watch[i] if floor else []
            row = [name, f"h{i}" + (" (writer)" if i == WRITER_HOST else ""), *_stats(routes)]
            if watch:
                row += _stats(watch)
                row += [f"{statistics.median(routes) / statistics.median(watch):.1f}x",
                        f"{percentile(routes, 0.99) / percentile(watch, 0.99):.1f}x"]
            else:
                row += ["—"] * 6
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Series], path: Path) -> None:
    """CDF of every host's latency per layout, the raw watch dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, (name, series) in zip(axes[0], results.items(), strict=True):
        lines = [(f"consulate h{i}", series.routes[i], "-", f"C{i - 1}") for i in HOSTS]
        if series.watch[1]:
            lines += [(f"raw etcd watch h{i}", series.watch[i], ":", f"C{i - 1}") for i in HOSTS]
        for label, values, style, shade in lines:
            xs = sorted(values)
            ax.step(xs, [100 * (k + 1) / len(xs) for k in range(len(xs))], style, where="post",
                    color=shade, label=label)
        ax.axvline(TARGET_P99_MS, color=colour("direct"), linestyle="--", linewidth=1,
                   label=f"target p99 {TARGET_P99_MS:g} ms")
        ax.set_xscale("log")
        ax.set_xlabel("PUT on h2 -> change seen (ms, log scale)")
        ax.set_ylabel("% of samples")
        ax.set_title(TITLES[name], fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("route convergence across 3 hosts: CDF per host", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict[str, Series], samples: int, minutes: float,
           load: tuple[float, float, float]) -> str:
    model = cpu_model()
    etcd_version = subprocess.run(["etcd", "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    polls = statistics.median(p for s in results.values() for p in s.polls)
    machine = [("cores", f"{os.cpu_count()} x {model}"),
               ("kernel (uname -r)", platform.release()),
               ("python", platform.python_version()), ("etcd", etcd_version)]
    conditions = [
        ("date (UTC)", f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}"),
        ("command", f"python -m bench.convergence --samples {samples} "
                    f"--layouts {','.join(results)}"),
        ("lab", "3 hosts (network namespaces, one fabric bridge), one `consulate agent` each"),
        ("change", "register `bench-N` through h2's agent API, the next sample deregisters "
                   "it (alternating; a base instance keeps the service and its VIP); 50-150 "
                   "ms random pause between samples"),
        ("clock", "`time.time()` in every process: the writer in h2 right before its PUT, an "
                  f"observer per host polling `GET /v1/agent/routes` every "
                  f"{POLL_INTERVAL * 1000:g} ms over one kept-alive connection once armed, "
                  f"and the raw etcd watch (aetcd `watch_prefix({ETCD_PREFIX}{SERVICE}/)` on "
                  "the host's own member) on arrival; all namespaces share one clock"),
        ("polling resolution", f"+0-{POLL_INTERVAL * 1000:g} ms plus one poll's round trip "
                               "on every route table number; median polls per sample and "
                               f"host: {polls:.0f}"),
        ("machine", "shared with other engineers' jobs while it ran (2 cores): the tail "
                    "includes their load; 1-minute load average at the start / end: "
                    f"{load[0]:.1f} / {os.getloadavg()[0]:.1f}"),
        ("total", f"{minutes:.1f} min"),
    ]
    out = [
        markdown("Route convergence across 3 hosts",
                 [("Machine", machine), ("Conditions", conditions)], (), {}, (), 0),
        "## Results (ms from the PUT on h2 to the change seen; min / **median** / p99 / max "
        "over the samples)", "",
        table(results), "",
    ]
    for name, series in results.items():
        out.append(f"- {name}: {TITLES[name]}; {len(series.routes[1])} samples in "
                   f"{series.seconds:.0f} s; the PUT's own round trip (h2): median "
                   f"{statistics.median(series.put_ms):.1f} ms, p99 "
                   f"{percentile(series.put_ms, 0.99):.1f} ms")
    if "etcd" in results:
        worst = max(percentile(results["etcd"].routes[i], 0.99) for i in HOSTS)
        verdict = "met" if worst < TARGET_P99_MS else "NOT met"
        out += ["", f"Target (issue 7): p99 < {TARGET_P99_MS:g} ms with etcd on every host: "
                f"**{verdict}** (worst host's p99: {worst:.1f} ms)."]
    if "join" in results:
        out += ["", "The join layout has no etcd: its raw watch columns repeat the etcd "
                "layout's (same run, same host) as the floor its ratios compare with."]
    out += ["", "![CDF of the convergence time per host](convergence.png)", ""]
    return "\n".join(out)


def results_json(results: dict[str, Series]) -> dict[str, Any]:
    return {name: {"routes_ms": {f"h{i}": s.routes[i] for i in HOSTS},
                   "raw_watch_ms": {f"h{i}": s.watch[i] for i in HOSTS},
                   "put_ms": s.put_ms, "seconds": s.seconds}
            for name, s in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100,
                        help="changes per layout, alternately a register and a deregister")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated, from {', '.join(LAYOUTS)}")
    args = parser.parse_args()
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown or not layouts:
        parser.error(f"--layouts {args.layouts!r}: unknown {', '.join(unknown) or 'none given'};"
                     f" use a comma-separated list from {', '.join(LAYOUTS)}")
    if args.samples < 2:
        parser.error(f"--samples {args.samples}: give at least 2 (a register and a deregister)")
    began, load = time.monotonic(), os.getloadavg()
    results: dict[str, Series] = {}
    with tempfile.TemporaryDirectory(prefix="bench-convergence-") as tmp:
        for name in layouts:
            print(f"layout {name}: {TITLES[name]}", flush=True)
            # A fresh lab per layout: nothing of one (ports, routes, leases) stays for the next.
            with labmod.up(hosts=3, containers=1) as lab:
                work = Path(tmp) / name
                work.mkdir()
                setup = etcd_layout if name == "etcd" else join_layout
                with setup(lab, work) as token:
                    results[name] = measure(lab, token, args.samples, name == "etcd")
            series = results[name]
            print("  median/p99 ms: " + ", ".join(
                f"h{i} {statistics.median(series.routes[i]):.1f}/"
                f"{percentile(series.routes[i], 0.99):.1f}" for i in HOSTS), flush=True)
    minutes = (time.monotonic() - began) / 60
    RESULTS.mkdir(exist_ok=True)
    chart(results, RESULTS / "convergence.png")
    (RESULTS / "convergence.md").write_text(report(results, args.samples, minutes, load))
    (RESULTS / "convergence.json").write_text(json.dumps(results_json(results), indent=1) + "\n")
    print(f"wrote {RESULTS / 'convergence.md'}, .json and .png in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
