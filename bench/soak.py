"""Soak: the mesh for a bounded time under steady load (issue 13, point 5).

A 3-host lab, an agent per host sharing one registry (a 3-member etcd cluster, one
member per host; ``--registry embedded``: h1's agent embeds it, h2 and h3 ``--join``
it). Service ``echo`` has a stable instance on h2 and one on h3, and for the whole
run, paced:

* connections by name: a client in h1c1 and one in h3c2 resolve
  ``echo.service.consul`` for every connection and echo a seeded payload through
  their host's transparent proxy, checked byte for byte (bench/soak_load.py);
* DNS: a prober in h1c2 sends real A and SRV queries to h1's agent;
* registrations churning: a backend in h2c2 comes and goes (started, registered
  through h2's agent, held, deregistered, killed), and instances of service
  ``churn`` are registered and deregistered through h3's agent every second.

A churned backend is killed only once every agent's route table has dropped it
(plus a grace for connections in flight), so every failed connection hit a live,
registered endpoint and counts as an error. Every few seconds the run samples each
agent's RSS (``/proc/PID/status``) and open fds (``/proc/PID/fd``). It writes
``soak.md`` (verdicts, per-agent growth, latencies and errors per window),
``soak.json`` and ``soak-memory.png``/``soak-latency.png`` to bench/results/.

    python -m bench.soak [--seconds 600] [--registry etcd|embedded] [--output DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` importable the same way
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import soak_report
from bench.convergence import OBSERVER, WRITER, Child, _put
from bench.signals import run_main
from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent
from consulate.control.labetcd import lab_cluster

RESULTS = Path(__file__).resolve().parent / "results"
LOAD = str(Path(__file__).resolve().with_name("soak_load.py"))
HOSTS = (1, 2, 3)
SERVICE, PORT = "echo", 7100
NAME = f"{SERVICE}.service.consul"
STABLE = {2: "echo-h2", 3: "echo-h3"}  # host -> backend id, in container c1
CHURN_BACKEND, CHURN_PORT = "echo-churn", 7200  # in h2c2, under ids echo-churn-N
API_CHURN_SERVICE = "churn"  # instances written and removed through h3's agent
API_CHURN_PERIOD = 1.0  # seconds between API churn writes
CHURN_PAUSE = 2.0  # seconds between a churned backend's end and the next one
GRACE = 1.0  # seconds between every route table dropping a backend and its kill
OBSERVER_POLL, OBSERVER_TIMEOUT = 0.02, 30.0
TOKEN = "soak-token"  # the embedded layout's API listens off loopback on h1
REGISTRIES = ("etcd", "embedded")


@dataclass
class Run:
    """What one soak measured; the report is made from it alone."""

    seconds: float
    registry: str
    rates: dict[str, float]
    sample: float  # seconds between samples of the agents' RSS and fds
    started: float = 0.0  # epoch of the load's start; every t below is relative to it
    # t, load1 (the machine's), agents: host -> rss_kib, fds
    samples: list[dict[str, Any]] = field(default_factory=list)
    echo: list[dict[str, Any]] = field(default_factory=list)  # one record per connection
    dns: list[dict[str, Any]] = field(default_factory=list)  # one record per query
    churn: list[dict[str, Any]] = field(default_factory=list)  # t, kind, ok, error
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start / end


def in_container(lab: labmod.Lab, host: int, number: int, argv: Sequence[str]) -> list[str]:
    """bench.convergence's Child starts a process in a host; this enters one of its
    containers from there (``ip netns exec`` again, so that the container's
    resolv.conf, which points at the host's agent, is mounted)."""
    return ["ip", "netns", "exec", lab.container_ns(host, number), *argv]


def load_process(lab: labmod.Lab, host: int, number: int, what: str, *args: str) -> Child:
    return Child(lab, host, in_container(lab, host, number, [sys.executable, LOAD, *args]),
                 f"{what} in h{host}c{number}")


def wait_routes(observers: dict[int, Child], ident: str, present: bool) -> None:
    """Until every agent's route table has (or no longer has) endpoint ``ident``."""
    for observer in observers.values():
        observer.send({"id": ident, "present": present})
    for i, observer in observers.items():
        observer.expect("armed", OBSERVER_TIMEOUT)
        if observer.expect("t", OBSERVER_TIMEOUT + 5)["t"] is None:
            raise RuntimeError(f"h{i}'s route table did not show {ident} present={present} "
                               f"within {OBSERVER_TIMEOUT:g} s")


def usage(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines()
               if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@contextmanager
def agents_on(lab: labmod.Lab, work: Path, registry: str) -> Iterator[dict[int, LabAgent]]:
    """An agent per host on the shared registry; all stopped (and etcd) on exit."""
    with ExitStack() as stack:
        if registry == "etcd":
            where = stack.enter_context(lab_cluster(lab, work, HOSTS)).registry
            flags = {i: ["--registry", where] for i in HOSTS}
        else:
            flags = {i: (["--http-addr", "0.0.0.0:8500"] if i == 1
                         else ["--join", f"{lab.host_ip(1)}:8500"]) for i in HOSTS}
        agents = {}
        for i in HOSTS:
            agents[i] = LabAgent(lab, i, work / f"agent-h{i}", work / f"agent-h{i}.log",
                                 token=TOKEN if registry == "embedded" else "",
                                 extra_args=flags[i])
            stack.callback(agents[i].stop)
            agents[i].start()
        yield agents


class Churn:
    """The two churning threads: a backend coming and going, API registrations."""

    def __init__(self, lab: labmod.Lab, run: Run, token: str, observers: dict[int, Child],
                 hold: float) -> None:
        self.lab, self.run, self.observers, self.hold = lab, run, observers, hold
        self.backend_writer = Child(lab, 2, [sys.executable, "-c", WRITER, token], "writer in h2")
        self.api_writer = Child(lab, 3, [sys.executable, "-c", WRITER, token], "writer in h3")
        self.stopping = threading.Event()
        self.leftovers: list[Child] = []  # churned backends that may still be routed
        self.threads = [threading.Thread(target=self._guarded, args=(self._backend, "backend")),
                        threading.Thread(target=self._guarded, args=(self._api, "api"))]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(OBSERVER_TIMEOUT * 2 + 30)
        for child in [self.backend_writer, self.api_writer, *self.leftovers]:
            child.stop()

    def _note(self, kind: str, error: str = "") -> None:
        self.run.churn.append({"t": time.time(), "kind": kind, "ok": not error,
                               **({"error": error} if error else {})})

    def _guarded(self, body: Callable[[], None], kind: str) -> None:
        """A churn failure is recorded and the loop starts over; it never ends the soak."""
        while not self.stopping.is_set():
            try:
                body()
            except RuntimeError as exc:
                self._note(kind, str(exc))
                self.stopping.wait(CHURN_PAUSE)

    def _backend(self) -> None:
        cycle = sum(1 for event in self.run.churn if event["kind"] == "backend")
        ident = f"{CHURN_BACKEND}-{cycle}"
        server = load_process(self.lab, 2, 2, CHURN_BACKEND, "serve", "--port",
                              str(CHURN_PORT), "--id", CHURN_BACKEND)
        try:
            _put(self.backend_writer, "/v1/agent/service/register",
                 {"ID": ident, "Name": SERVICE, "Address": self.lab.container_ip(2, 2),
                  "Port": CHURN_PORT})
            wait_routes(self.observers, ident, True)
            self.stopping.wait(self.hold)
            _put(self.backend_writer, f"/v1/agent/service/deregister/{ident}", None)
            wait_routes(self.observers, ident, False)
            time.sleep(GRACE)  # connections that picked it just before it left
        except RuntimeError:
            # A proxy may still pick it: killing it would turn the churn's failure into
            # errors on an endpoint that looks live. It serves until the soak ends (the
            # next one shares its port: SO_REUSEPORT).
            self.leftovers.append(server)
            raise
        server.stop()
        self._note("backend")
        self.stopping.wait(CHURN_PAUSE)

    def _api(self) -> None:
        number = sum(1 for event in self.run.churn if event["kind"] == "api")
        ident = f"{API_CHURN_SERVICE}-{number}"
        _put(self.api_writer, "/v1/agent/service/register",
             {"ID": ident, "Name": API_CHURN_SERVICE, "Address": self.lab.container_ip(3, 2),
              "Port": 9000 + number % 100})
        if number:
            _put(self.api_writer, f"/v1/agent/service/deregister/{API_CHURN_SERVICE}-"
                                  f"{number - 1}", None)
        self._note("api")
        self.stopping.wait(API_CHURN_PERIOD)


def soak(run: Run, hold: float) -> None:
    """Build the lab, load it for ``run.seconds`` while sampling; everything stopped."""
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp, \
            labmod.up(hosts=len(HOSTS), containers=2) as lab, \
            agents_on(lab, Path(tmp), run.registry) as agents, ExitStack() as stack:
        token = agents[1].token
        observers = {}
        for i in HOSTS:
            observers[i] = Child(lab, i, [sys.executable, "-c", OBSERVER, SERVICE, token,
                                          str(OBSERVER_POLL), str(OBSERVER_TIMEOUT)],
                                 f"observer in h{i}")
            stack.callback(observers[i].stop)
        for i, ident in STABLE.items():
            stack.callback(load_process(lab, i, 1, ident, "serve", "--port", str(PORT),
                                        "--id", ident).stop)
            agents[i].register(SERVICE, ident, lab.container_ip(i, 1), PORT)
        for ident in STABLE.values():
            wait_routes(observers, ident, True)
        vip = next(r["VIP"] for r in agents[1].api("GET", "/v1/agent/routes")
                   if r["Service"] == SERVICE)
        backends = ",".join([*STABLE.values(), CHURN_BACKEND])
        seconds = f"{run.seconds:g}"
        run.load = (os.getloadavg()[0], 0.0)
        run.started = time.time()
        clients = {
            "echo": [load_process(lab, host, number, "echo client", "echo", "--name", NAME,
                                  "--port", str(PORT), "--rate", f"{run.rates['echo']:g}",
                                  "--seconds", seconds, "--backends", backends)
                     for host, number in ((1, 1), (3, 2))],
            "dns": [load_process(lab, 1, 2, "DNS prober", "dns", "--name", NAME, "--vip", vip,
                                 "--server", f"{lab.bridge_ip(1)}:53",
                                 "--rate", f"{run.rates['dns']:g}", "--seconds", seconds)],
        }
        for child in (c for group in clients.values() for c in group):
            stack.callback(child.stop)
        churn = Churn(lab, run, token, observers, hold)
        stack.callback(churn.stop)
        churn.start()
        pids = {i: agent.process.pid for i, agent in agents.items() if agent.process}
        deadline = time.monotonic() + run.seconds
        while True:
            now = time.time()
            run.samples.append({"t": now - run.started, "load1": os.getloadavg()[0],
                                "agents": {f"h{i}": dict(zip(("rss_kib", "fds"), usage(pid),
                                                             strict=True))
                                           for i, pid in pids.items()}})
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(run.sample, left))
        churn.stop()
        for kind, group in clients.items():
            for child in group:
                getattr(run, kind).extend(_drain(child))
        run.load = (run.load[0], os.getloadavg()[0])
        for i, agent in agents.items():
            if agent.process is None or agent.process.poll() is not None:
                raise RuntimeError(f"h{i}'s agent died during the soak:\n{agent.log()[-2000:]}")


def _drain(child: Child) -> list[dict[str, Any]]:
    """Every record a client printed; it ends on its own after --seconds, and one that
    failed (rather than counting its failures) makes the soak fail."""
    code = child.process.wait(30)
    if code != 0:
        assert child.process.stderr is not None
        raise RuntimeError(f"{child.what} exited with {code}: "
                           f"{child.process.stderr.read()[-2000:]}")
    records = []
    while (message := child.lines.get(timeout=10)) is not None:
        records.append(message)
    return records


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0,
                        help="how long the load runs (default 600: 10 minutes)")
    parser.add_argument("--sample", type=float, default=5.0,
                        help="seconds between RSS/fd samples of every agent")
    parser.add_argument("--window", type=float, default=0.0,
                        help="seconds per latency window (default: 1/20 of the run, >= 5)")
    parser.add_argument("--echo-rate", type=float, default=10.0,
                        help="connections per second of each of the 2 echo clients")
    parser.add_argument("--dns-rate", type=float, default=25.0, help="DNS queries per second")
    parser.add_argument("--registry", default="etcd" if shutil.which("etcd") else "embedded",
                        choices=REGISTRIES, help="etcd cluster (default) or embedded + --join")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help="where soak.md, soak.json and the plots go")
    args = parser.parse_args(argv)
    for name in ("seconds", "sample", "echo_rate", "dns_rate"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name):g}: give a "
                         "positive number")
    if args.seconds < 10:
        parser.error(f"--seconds {args.seconds:g}: give at least 10 (a backend churn cycle "
                     "and a few samples)")
    if args.window < 0:
        parser.error(f"--window {args.window:g}: give a positive number, or 0 for the default")
    args.window = args.window or max(5.0, args.seconds / 20)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(args.seconds, args.registry, {"echo": args.echo_rate, "dns": args.dns_rate},
              args.sample)
    command = "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    hold = min(10.0, args.seconds / 5)  # the churned backend's time in the routes
    print(f"soak: {args.seconds:g} s, registry {args.registry}", flush=True)
    soak(run, hold)
    args.output.mkdir(parents=True, exist_ok=True)
    summary = soak_report.write(run, args.output, args.window, command.strip(), hold)
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
