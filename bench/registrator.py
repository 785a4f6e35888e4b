"""How fast do 100 containers started together appear in the registry? (issue 6)

One lab host runs a real dockerd and ``consulate agent`` with its registrator
(the consulate:// adapter into the agent's own registry, as in production).
Each repetition creates N busybox containers (``SERVICE_NAME=bench``, port 80
published), starts them all at once from 16 threads, and records two clocks:

* started: dockerd's own ``start`` event of each container (the peer: Docker's
  pace, which bounds any registrator);
* registered: when the container's service shows in the agent's catalog, seen
  by a blocking query (``/v1/catalog/service/bench?index=``) from inside the host.

Reported over the repetitions as min / median / max: the time from the first
start call to the last start event and to the last registration, the gap
between those two (the target: all registered within 5 s of the last start),
and each container's own lag from its start event to its registration. Writes
``results/registrator.md`` and ``results/registrator.png``.

    python -m bench.registrator [--containers 100] [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `consulate` importable the same way
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_model
from bench.signals import run_main
from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent
from consulate.control.labdocker import LabDocker, busybox_image_tar

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 5.0  # seconds from the last start to the last registration
STARTERS = 16  # threads calling POST /containers/<id>/start
TIMEOUT = 180.0

# Runs inside the lab host: prints {"id", "t"} when a service first shows in the catalog.
WATCHER = """
import json, sys, time, urllib.request
want, index, seen = int(sys.argv[1]), 0, set()
deadline = time.time() + float(sys.argv[2])
print(json.dumps({"ready": True}), flush=True)
while len(seen) < want and time.time() < deadline:
    url = f"http://127.0.0.1:8500/v1/catalog/service/bench?index={index}&wait=5s"
    with urllib.request.urlopen(url, timeout=10) as answer:
        index = int(answer.headers["X-Consul-Index"])
        now = time.time()
        for entry in json.load(answer):
            if entry["ServiceID"] not in seen:
                seen.add(entry["ServiceID"])
                print(json.dumps({"id": entry["ServiceID"], "t": now}), flush=True)
"""


@dataclass
class Rep:
    began: float = 0.0  # wall clock of the first start call
    started: dict[str, float] = field(default_factory=dict)  # container name -> event time
    registered: dict[str, float] = field(default_factory=dict)  # container name -> seen
    sync: float = 0.0  # a fresh agent finding them running: ready -> last registered

    def last_started(self) -> float:
        return max(self.started.values()) - self.began

    def last_registered(self) -> float:
        return max(self.registered.values()) - self.began

    def lags(self) -> list[float]:
        return [self.registered[n] - self.started[n] for n in self.started
                if n in self.registered]


def watch(lab: labmod.Lab, count: int) -> subprocess.Popen[str]:
    """The catalog watcher in the lab host, once it is about to poll."""
    watcher = lab.popen("h1", [sys.executable, "-c", WATCHER, str(count), str(TIMEOUT)],
                        stdout=subprocess.PIPE, text=True)
    assert watcher.stdout is not None
    assert json.loads(watcher.stdout.readline()) == {"ready": True}
    return watcher


def sightings(watcher: subprocess.Popen[str]) -> dict[str, float]:
    """Container name -> when its service first showed, until the watcher ends."""
    assert watcher.stdout is not None
    seen = {json.loads(line)["id"].split(":")[1]: json.loads(line)["t"]
            for line in watcher.stdout}
    watcher.wait()
    return seen


def started_together(lab: labmod.Lab, daemon: LabDocker, count: int) -> Rep:
    """Create ``count`` containers, then start them all at once; both clocks of each."""
    ids = [daemon.api.create_container(
        "busybox:local", ["sleep", "3600"], name=f"bench{i}", ports=[80],
        environment={"SERVICE_NAME": "bench"}, stop_timeout=1,
        host_config=daemon.api.create_host_config(port_bindings={80: None}))["Id"]
        for i in range(count)]
    watcher = watch(lab, count)
    events = daemon.api.events(decode=True, filters={"type": "container", "event": ["start"]})
    rep = Rep()

    def record_starts() -> None:
        for event in events:
            rep.started[event["Actor"]["Attributes"]["name"]] = event["timeNano"] / 1e9
            if len(rep.started) == count:
                return

    listener = threading.Thread(target=record_starts, daemon=True)
    listener.start()
    rep.began = time.time()
    with ThreadPoolExecutor(STARTERS) as pool:
        list(pool.map(daemon.api.start, ids))
    rep.registered = sightings(watcher)
    listener.join(TIMEOUT)
    events.close()
    return rep


def initial_sync(lab: labmod.Lab, daemon: LabDocker, work: Path, count: int) -> float:
    """A new agent (empty registry) on a host where ``count`` containers run: seconds
    from its registrator's subscription to its last ``added:`` line (the registrator's
    own pace: inspect and register each), both read from the agent's log. All must
    show in the catalog, and leave it when the containers are removed."""
    work.mkdir(parents=True, exist_ok=True)
    agent = LabAgent(lab, 1, work / "data", work / "agent.log",
                     extra_args=["--docker-host", daemon.url]).start()
    try:
        seen = sightings(watch(lab, count))
        if len(seen) < count:
            raise RuntimeError(f"the initial sync registered {len(seen)} of {count}")
        clear(daemon, agent)
    finally:
        agent.stop()
    stamps = {}
    for line in agent.log().splitlines():
        for mark in ("Listening for Docker events", "added:"):
            if mark in line:
                stamps[mark] = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return (stamps["added:"] - stamps["Listening for Docker events"]).total_seconds()


def clear(daemon: LabDocker, agent: LabAgent) -> None:
    daemon.remove_all()
    deadline = time.monotonic() + 60
    while agent.api("GET", "/v1/catalog/service/bench"):
        if time.monotonic() > deadline:
            raise RuntimeError("the registry still holds bench services a minute after "
                               "their containers were removed")
        time.sleep(0.2)


def mmm(values: list[float]) -> str:
    """min / **median** / max, in seconds."""
    return (f"{min(values):.2f} / **{statistics.median(values):.2f}** / "
            f"{max(values):.2f}")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def chart(reps: list[Rep], count: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (timeline, lags) = plt.subplots(1, 2, figsize=(13, 4.5))
    for number, rep in enumerate(reps, 1):
        colour = f"C{number - 1}"
        for times, style, what in ((rep.started, ":", "started (dockerd)"),
                                   (rep.registered, "-", "registered (catalog)")):
            xs = sorted(t - rep.began for t in times.values())
            timeline.step(xs, range(1, len(xs) + 1), style, where="post", color=colour,
                          label=f"rep {number}: {what}")
        ms = sorted(lag * 1000 for lag in rep.lags())
        lags.step(ms, [100 * (i + 1) / len(ms) for i in range(len(ms))], where="post",
                  color=colour, label=f"rep {number}")
    timeline.set_xlabel("seconds since the first start call")
    timeline.set_ylabel("containers")
    timeline.set_ylim(0, count * 1.05)
    timeline.set_title("started (dotted) and registered (solid): the curves coincide")
    timeline.grid(alpha=0.3)
    timeline.legend(fontsize=7)
    lags.set_xscale("log")
    lags.set_xlabel("start event -> in the catalog (ms, log scale)")
    lags.set_ylabel("% of containers")
    lags.set_title("each container's registration lag")
    lags.grid(alpha=0.3, which="both")
    lags.legend(fontsize=8)
    fig.suptitle(f"{count} containers started together on 2 cores", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(reps: list[Rep], count: int, minutes: float) -> str:
    last_start = [r.last_started() for r in reps]
    last_reg = [r.last_registered() for r in reps]
    gaps = [r.last_registered() - r.last_started() for r in reps]
    lags = [r.lags() for r in reps]
    complete = all(len(r.registered) == count for r in reps)
    counts = ", ".join(f"{len(r.registered)}/{len(r.started)}" for r in reps)
    model = cpu_model()
    verdict = ("met" if complete and max(gaps) <= TARGET else "NOT met")
    return "\n".join([
        "# Registrator: containers started together, registered", "",
        "## Machine", "", "| | |", "|---|---|",
        f"| cores | {os.cpu_count()} x {model} |",
        f"| kernel (uname -r) | {platform.release()} |",
        f"| python | {platform.python_version()} |",
        f"| dockerd | {docker_version()} |", "",
        "## Conditions", "", "| | |", "|---|---|",
        f"| date (UTC) | {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} |",
        f"| command | python -m bench.registrator --containers {count} --reps {len(reps)} |",
        "| path | dockerd (vfs, in a lab host) -> event -> `consulate agent`'s registrator "
        "(inspect, derive) -> consulate:// adapter -> the agent's HTTP API -> embedded "
        "registry -> catalog blocking query from the same host |",
        f"| start | {count} containers created first, then started from {STARTERS} threads "
        "at once; busybox `sleep`, `-p 80` (a random host port each) |",
        f"| repetitions | {len(reps)}; containers removed and deregistered between them; "
        f"total {minutes:.1f} min |", "",
        "## Results (seconds, min / **median** / max over the repetitions)", "",
        "| | seconds |", "|---|---|",
        f"| first start call -> last start event (Docker's own pace) | {mmm(last_start)} |",
        f"| first start call -> last registration | {mmm(last_reg)} |",
        f"| last start event -> last registration | {mmm(gaps)} |",
        f"| per container, start event -> registered: median | "
        f"{mmm([statistics.median(x) for x in lags])} |",
        f"| per container, start event -> registered: 95th percentile | "
        f"{mmm([percentile(x, 0.95) for x in lags])} |",
        f"| per container, start event -> registered: max | {mmm([max(x) for x in lags])} |",
        f"| a new agent finding {count} running: subscribed -> last `added:` (initial "
        f"sync, from its log) | {mmm([r.sync for r in reps])} |",
        f"| registered / started, each repetition | {counts} |",
        "",
        f"Target (issue 6): all {count} registered within {TARGET:g} s: **{verdict}** "
        f"(worst repetition: the last registration {max(gaps):.2f} s after the last "
        "start event).", "",
        "![started vs registered over time](registrator.png)", "",
    ])


def docker_version() -> str:
    done = subprocess.run(["dockerd", "--version"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    began = time.monotonic()
    reps: list[Rep] = []
    with tempfile.TemporaryDirectory(prefix="bench-registrator-") as tmp, \
            labmod.up(hosts=1, containers=0) as lab:
        work = Path(tmp)
        daemon = LabDocker(lab, 1, work / "dockerd").start()
        try:
            daemon.import_image(busybox_image_tar())
            for number in range(1, args.reps + 1):
                agent = LabAgent(lab, 1, work / f"events{number}", work / "agent.log",
                                 extra_args=["--docker-host", daemon.url]).start()
                try:
                    rep = started_together(lab, daemon, args.containers)
                finally:
                    agent.stop()
                rep.sync = initial_sync(lab, daemon, work / f"sync{number}", args.containers)
                reps.append(rep)
                print(f"rep {number}: last start {rep.last_started():.2f}s, last registered "
                      f"{rep.last_registered():.2f}s, {len(rep.registered)}/"
                      f"{len(rep.started)} registered, median lag "
                      f"{statistics.median(rep.lags()):.3f}s; initial sync {rep.sync:.2f}s",
                      flush=True)
        finally:
            daemon.stop()
    minutes = (time.monotonic() - began) / 60
    RESULTS.mkdir(exist_ok=True)
    chart(reps, args.containers, RESULTS / "registrator.png")
    (RESULTS / "registrator.md").write_text(report(reps, args.containers, minutes))
    print(f"wrote {RESULTS / 'registrator.md'} and .png in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
