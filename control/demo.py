"""``consulate demo``: the mesh end to end in a throwaway lab, narrated step by step.

One host runs a real agent; containers c1 and c2 serve HTTP as service ``web``;
container c3 calls ``http://web.service.consul/`` and sees round-robin answers,
then keeps getting answers after web-1 dies, because the proxy retries on
another endpoint. ``--hosts 3`` runs the many-host demo instead (demo_hosts.py),
on the same narration and teardown. Traffic only goes to the lab's own addresses
(PLATFORM.md, "The network rule"), and everything is torn down whatever happens.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from consulate.control import lab as labs
from consulate.control.labagent import LabAgent

STEPS = 7
READY_TIMEOUT = 5.0  # seconds for a backend, or the route table, to become ready
URL = "http://web.service.consul/"
LOG_TAIL = 15
# wget -q prints nothing on failure: its documented exit statuses say what went wrong.
WGET_EXIT = {4: "network failure", 8: "the server answered with an error"}


def _wget(url: str, timeout: int = 5) -> list[str]:
    """GNU wget with one try: retrying a dead backend is the proxy's job, not wget's."""
    return ["/usr/bin/wget", "-qO-", "-T", str(timeout), "--tries=1", "--no-proxy", url]


class DemoError(RuntimeError):
    """A step did not do what the demo promises; the message says what was seen."""


class LabDemo(abc.ABC):
    """What every demo shares: its lab, temp dir and backends, so that teardown finds
    all of them, and the narration of its numbered steps."""

    steps = STEPS

    def __init__(self, hosts: int, containers: int) -> None:
        # The name is fixed before anything is built, so teardown can remove
        # a lab interrupted half-way through being built.
        self.name = f"{labs.LAB_PREFIX}demo-{os.urandom(3).hex()}"
        self.work = Path(tempfile.mkdtemp(prefix="consulate-demo-"))
        self.lab = labs.Lab(self.name, hosts=hosts, containers=containers)
        self.backends: dict[str, subprocess.Popen[bytes]] = {}
        self.step = 0
        self.agent_log: list[str] = []  # kept by teardown, which removes the files

    @contextlib.contextmanager
    def narrate(self, text: str) -> Iterator[list[str]]:
        """Print ``[n/N] text... ok (t s)``, then the lines the step collected, indented."""
        self.step += 1
        print(f"[{self.step}/{self.steps}] {text}...", end="", flush=True)
        started = time.monotonic()
        shown: list[str] = []
        outcome = "FAILED"
        try:
            yield shown
            outcome = "ok"
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        finally:
            print(f"  {outcome} ({time.monotonic() - started:.1f} s)")
            for line in shown:
                print(f"      {line}")

    @abc.abstractmethod
    def run(self) -> None:
        """The steps; raises DemoError (or whatever broke) at the first failure."""

    @abc.abstractmethod
    def teardown(self) -> None:
        """Stop and remove everything run() started, whichever step it reached."""

    def wait_for(self, what: str, ready: Callable[[], bool],
                 timeout: float = READY_TIMEOUT) -> None:
        """Poll ``ready()`` for at most ``timeout`` seconds: a demo never hangs."""
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise DemoError(f"no {what} after {timeout:.0f} s")
            time.sleep(0.05)

    def answers(self, host: int, ip: str) -> bool:
        """Whether the web server at ip answers, asked from a host (not through the mesh)."""
        done = self.lab.exec(f"h{host}", _wget(f"http://{ip}/", timeout=1),
                             capture_output=True, timeout=5)
        return bool(done.returncode == 0)  # typeshed types returncode as int | Any

    def serve_web(self, host: int, container: int, backend: str) -> str:
        """busybox httpd on port 80 of a container, answering ``hello from <backend>``;
        returns its address once it answers."""
        ip = self.lab.container_ip(host, container)
        root = self.work / backend
        root.mkdir()
        (root / "index.html").write_text(f"hello from {backend} ({ip})\n")
        self.backends[backend] = self.lab.popen(
            f"h{host}c{container}", ["busybox", "httpd", "-f", "-p", "80", "-h", str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_for(f"{backend} answering on {ip}:80",
                      functools.partial(self.answers, host, ip))
        return ip

    def call_web(self, client: str, times: int, shown: list[str]) -> list[str]:
        """Call the service from container ``client`` (e.g. "h1c3") ``times`` times; the
        backend ids that answered, in order. On a one-host lab the output names the
        container without its host ("c3")."""
        answered = []
        label = client.removeprefix("h1") if self.lab.hosts == 1 else client
        for _ in range(times):
            done = self.lab.exec(client, _wget(URL), capture_output=True, text=True, timeout=15)
            if done.returncode != 0:
                why = WGET_EXIT.get(done.returncode, done.stderr.strip() or "no output")
                raise DemoError(f"wget {URL} from {label} failed (exit {done.returncode}: "
                                f"{why})")
            body = done.stdout.strip()
            shown.append(f"{label}$ wget {URL}  ->  {body}")
            answered.append(next((b for b in self.backends if f"from {b} " in body), body))
        return answered

    def stop_backends(self) -> None:
        for backend in self.backends.values():
            if backend.poll() is None:
                backend.terminate()  # by PID: the Popen's own process
                backend.wait(5)


class Demo(LabDemo):
    """One host: the agent, two web backends and a client container."""

    def __init__(self) -> None:
        super().__init__(hosts=1, containers=3)
        self.agent = LabAgent(self.lab, 1, self.work / "data", self.work / "agent.log")

    def c3(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run argv in container c3, the client, whose resolv.conf points at the agent."""
        done: subprocess.CompletedProcess[str] = self.lab.exec(
            "h1c3", argv, capture_output=True, text=True, timeout=15)
        return done

    def run(self) -> None:
        """Steps 1-6; raises DemoError (or whatever broke) at the first failure."""
        with self.narrate("Building a lab: 1 host, 3 containers (network namespaces, "
                          "no route out)") as shown:
            labs.up(1, 3, name=self.name)
            shown.append(f"lab {self.name}: host h1 {self.lab.host_ip(1)}, containers "
                         + ", ".join(self.lab.container_ip(1, j) for j in (1, 2, 3)))

        with self.narrate("Starting the consulate agent in h1 (proxy, DNS on "
                          f"{self.lab.bridge_ip(1)}:53, iptables rules)"):
            self.agent.data_dir.mkdir()
            self.agent.start()

        with self.narrate("Starting web servers in c1 and c2, registering them as "
                          "service 'web'") as shown:
            for j in (1, 2):
                backend = f"web-{j}"
                ip = self.serve_web(1, j, backend)
                self.agent.register("web", backend, ip, 80)
                shown.append(f"{backend}: busybox httpd in c{j} at {ip}:80, registered")
            self.wait_for("both endpoints in the agent's route table",
                          lambda: self.routes().get("endpoints") == 2)

        with self.narrate("Looking up web.service.consul from c3 (its resolv.conf "
                          "points at the agent)") as shown:
            done = self.c3(["dig", "+short", "web.service.consul"])
            answer = done.stdout.strip()
            shown.append(f"web.service.consul -> {answer or done.stderr.strip()} "
                         "(the service's virtual IP)")
            vip = self.routes().get("vip")
            if answer != vip or ipaddress.ip_address(answer) not in ipaddress.ip_network(
                    "240.0.0.0/4"):
                raise DemoError(f"dig answered {answer!r}, expected the VIP {vip} in 240.0.0.0/4")

        with self.narrate(f"Calling {URL} 4 times from c3: the proxy balances "
                          "round-robin") as shown:
            answered = self.call_web("h1c3", 4, shown)
            if set(answered) != {"web-1", "web-2"} or any(
                    a == b for a, b in itertools.pairwise(answered)):
                raise DemoError(f"answers did not alternate between web-1 and web-2: {answered}")

        with self.narrate("Killing web-1 (still registered), then calling 6 times: "
                          "every call must still succeed") as shown:
            dead = self.backends["web-1"]
            os.kill(dead.pid, signal.SIGKILL)
            dead.wait(5)
            failures_before = self.connect_failures()
            answered = self.call_web("h1c3", 6, shown)
            if set(answered) != {"web-2"}:
                raise DemoError(f"expected every answer from web-2, got {answered}")
            retried = self.connect_failures() - failures_before
            if retried < 1:
                raise DemoError("the proxy reports no failed connect to web-1: nothing was retried")
            shown.append(f"the proxy found web-1 dead {retried} times and retried on web-2; "
                         "no call failed")

    def routes(self) -> dict[str, Any]:
        """Service web as the agent's route table holds it ({} when absent)."""
        stats = self.agent.api("GET", "/v1/agent/self")["Stats"]
        return dict(stats["routes"]["services"].get("web", {}))

    def connect_failures(self) -> int:
        """The proxy's failed upstream connects for web: each one was retried elsewhere."""
        stats = self.agent.api("GET", "/v1/agent/self")["Stats"]
        return int(stats["proxy"]["services"].get("web", {}).get("connect_failures", 0))

    def teardown(self) -> None:
        """Agent first (SIGTERM: it removes its iptables rules), backends, lab, temp files."""
        self.step = self.steps - 1  # teardown is the last step, whichever step failed
        with self.narrate("Tearing down: agent, web servers, lab, temporary files"):
            code = self.agent.stop()
            self.agent_log = self.agent.log().splitlines()[-LOG_TAIL:]
            self.stop_backends()
            labs.down(self.name)
            shutil.rmtree(self.work, ignore_errors=True)
            if code != 0:
                raise DemoError(f"the agent exited with {code} on SIGTERM")


def run_demo(hosts: int = 1) -> int:
    """Run the demo (one host, or three: ``consulate demo --hosts 3``); 0 when every
    step passed, 1 on a failure, 130 on Ctrl-C."""
    demo: LabDemo
    if hosts == 3:
        # Imported here: demo_hosts builds on this module's LabDemo.
        from consulate.control.demo_hosts import HostsDemo

        demo = HostsDemo()
    else:
        demo = Demo()
    failure, status = "", 0
    try:
        demo.run()
    except KeyboardInterrupt:
        failure, status = "interrupted (Ctrl-C)", 130
    except Exception as exc:  # any failure must be reported, and torn down
        failure, status = f"at step {demo.step}: {exc}", 1
    finally:
        # A second Ctrl-C must not leave namespaces or iptables rules behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            demo.teardown()
        except Exception as exc:
            if not failure:  # the first failure is the one worth reporting
                failure, status = f"at step {demo.step}: {exc}", 1
        finally:
            signal.signal(signal.SIGINT, previous)
    if not failure:
        print("demo passed")
        return 0
    if status == 130:
        print(f"demo {failure}")
        return status
    print(f"demo FAILED {failure}\n  last lines of the agent logs:")
    for line in demo.agent_log:
        print(f"      {line}")
    return status
