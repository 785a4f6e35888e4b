"""The processes of the TCP benchmark: servers in container c1, proxies in host h1.

Every process is started with ``Lab.popen``, which gives it its own session, so its
process group holds it and whatever it forks (socat forks one child per
connection). That lets the harness sum CPU time over everything a proxy runs, pin
all of its threads to a core, and stop it by the group's id, never by name.

Each variant ("direct", "consulate-python", "haproxy", ...) is a function that
starts its proxy and returns where the client must connect for each backend; the
harness treats them all alike.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from consulate.control.lab import Lab
from consulate.control.labagent import LabAgent

HOST, SERVER, CLIENT = "h1", "h1c1", "h1c2"
READY_TIMEOUT = 10.0  # seconds for a server, proxy or route to start answering
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
CLK_TCK = os.sysconf("SC_CLK_TCK")


class PeerError(RuntimeError):
    """A server or proxy did not start or does not forward; the message says why."""


@dataclass(frozen=True)
class Backend:
    """A server port in c1 that every variant must reach."""

    key: str
    port: int

    @property
    def proxy_port(self) -> int:
        """Where haproxy and socat listen on h1's bridge address for this backend."""
        return self.port + 10000

    @property
    def service(self) -> str:
        """consulate routes by VIP alone (it ignores the destination port), so each
        backend port is a service of its own."""
        return f"bench-{self.key}"


IPERF = Backend("iperf", 5201)
HTTP_CLOSE = Backend("http-close", 8080)  # nginx keepalive_timeout 0: a connection per request
HTTP_KEEPALIVE = Backend("http-keepalive", 8081)  # keep-alive: requests on open connections
BACKENDS = (IPERF, HTTP_CLOSE, HTTP_KEEPALIVE)


def taskset(cpus: set[int] | None) -> list[str]:
    """The argv prefix that starts a command on ``cpus`` (nothing when unpinned)."""
    return ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The name is in parentheses and may hold spaces: split after the last ')'.
    return text[text.rindex(")") + 2:].split()


@dataclass
class Group:
    """A process started in its own session, and everything in its process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pgid(self) -> int:
        return self.popen.pid  # a session leader's pid is its group id

    def members(self) -> dict[int, list[str]]:
        """/proc stat fields of every live process of the group, by pid."""
        found = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = _stat(int(entry.name))
                if fields is not None and int(fields[2]) == self.pgid:
                    found[int(entry.name)] = fields
        return found

    def cpu_seconds(self) -> float:
        """User + system time of the group, including children it has reaped.

        Taking the difference of two readings counts a child forked and reaped in
        between once (through its parent's cutime/cstime) and a child alive at both
        readings by its own utime/stime growth.
        """
        ticks = sum(int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
                    for f in self.members().values())
        return ticks / CLK_TCK

    def threads(self) -> int:
        return sum(int(f[17]) for f in self.members().values())

    def set_cpus(self, cpus: set[int]) -> None:
        """Move every thread of the group onto ``cpus``; threads and children made
        later inherit it."""
        for pid in self.members():
            with contextlib.suppress(OSError):  # a thread or child that just exited
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(int(tid), cpus)

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise PeerError(f"{self.name} exited with status {code}: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "no log"
        return " | ".join(tail) or "empty log"

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it after STOP_GRACE, then any member left behind.

        The group is signalled only while its leader is unreaped, so its id cannot
        have been reused by an unrelated process.
        """
        if self.popen.poll() is None:
            os.killpg(self.pgid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                os.killpg(self.pgid, signal.SIGKILL)
                self.popen.wait()
        for pid in self.members():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def spawn(lab: Lab, where: str, name: str, argv: Sequence[str], log_path: Path) -> Group:
    """Start argv in a lab namespace, its output in log_path."""
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        popen = lab.popen(where, argv, stdin=subprocess.DEVNULL, stdout=log,
                          stderr=subprocess.STDOUT)
    return Group(name, popen, log_path)


def wait_listening(lab: Lab, where: str, port: int, group: Group) -> None:
    """Wait until something listens on TCP ``port`` in ``where``; fail if group died."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        group.check_alive()
        done = lab.exec(where, ["ss", "-Hltn", f"sport = :{port}"],
                        capture_output=True, text=True, timeout=10)
        if done.stdout.strip():
            return
        time.sleep(0.05)
    raise PeerError(f"{group.name} is not listening on port {port} after {READY_TIMEOUT:.0f} s: "
                    f"{group.log_tail()}")


# -- servers in c1 ----------------------------------------------------------------


def nginx_config(work: Path) -> str:
    """One worker, no logs, every path in ``work``: one port closes after each
    request, the other keeps connections open."""
    temp = "\n".join(f"    {kind}_temp_path {work / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
worker_processes 1;
daemon off;
pid {work / "nginx.pid"};
error_log {work / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    server {{
        listen {HTTP_CLOSE.port};
        keepalive_timeout 0;
        location / {{ return 200 "ok\\n"; }}
    }}
    server {{
        listen {HTTP_KEEPALIVE.port};
        keepalive_requests 100000000;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def start_servers(lab: Lab, work: Path) -> list[Group]:
    """iperf3 and nginx in c1, unpinned; returns once both listen."""
    nginx_dir = work / "nginx"
    nginx_dir.mkdir(parents=True)
    conf = nginx_dir / "nginx.conf"
    conf.write_text(nginx_config(nginx_dir))
    groups = [
        spawn(lab, SERVER, "iperf3 server", ["iperf3", "-s", "-p", str(IPERF.port)],
              work / "iperf3-server.log"),
        spawn(lab, SERVER, "nginx", ["nginx", "-p", str(nginx_dir), "-c", str(conf),
                                     "-e", str(nginx_dir / "error.log")],
              work / "nginx.log"),
    ]
    try:
        wait_listening(lab, SERVER, IPERF.port, groups[0])
        for backend in (HTTP_CLOSE, HTTP_KEEPALIVE):
            wait_listening(lab, SERVER, backend.port, groups[1])
    except BaseException:
        for group in groups:
            group.stop()
        raise
    return groups


# -- variants -----------------------------------------------------------------------


@dataclass(frozen=True)
class Env:
    """What a variant needs to start: the lab, a fresh directory, the proxy's cores."""

    lab: Lab
    work: Path
    proxy_cpus: set[int] | None  # None: unpinned


@dataclass
class Running:
    """A started variant: where c2 connects for each backend, and what to account."""

    targets: dict[str, tuple[str, int]]  # backend key -> (address, port)
    groups: list[Group] = field(default_factory=list)  # proxy-side processes
    stop: Callable[[], object] = lambda: None
    note: str = ""  # what the harness learnt at start (relay engine, threads)

    def cpu_seconds(self) -> float:
        return sum(group.cpu_seconds() for group in self.groups)

    def set_cpus(self, cpus: set[int]) -> None:
        for group in self.groups:
            group.set_cpus(cpus)

    def check_alive(self) -> None:
        for group in self.groups:
            group.check_alive()


def _stop_all(groups: list[Group]) -> Callable[[], None]:
    def stop() -> None:
        for group in groups:
            group.stop()
    return stop


def start_direct(env: Env) -> Running:
    ip = env.lab.container_ip(1, 1)
    return Running({b.key: (ip, b.port) for b in BACKENDS})


def haproxy_config(lab: Lab, global_lines: Sequence[str], defaults_lines: Sequence[str]) -> str:
    """TCP mode, one listener per backend on h1's bridge address; thread count and
    buffers left at haproxy's defaults unless a flavour says otherwise."""
    listens = "".join(
        f"\nlisten {b.key}\n    bind {lab.bridge_ip(1)}:{b.proxy_port}\n"
        f"    server {b.key} {lab.container_ip(1, 1)}:{b.port}\n"
        for b in BACKENDS
    )
    extra_global = "".join(f"    {line}\n" for line in global_lines)
    extra_defaults = "".join(f"    {line}\n" for line in defaults_lines)
    return (f"global\n{extra_global}"
            "defaults\n    mode tcp\n    timeout connect 5s\n"
            f"    timeout client 1m\n    timeout server 1m\n{extra_defaults}{listens}")


def start_haproxy(env: Env, global_lines: Sequence[str] = (),
                  defaults_lines: Sequence[str] = ()) -> Running:
    cfg = env.work / "haproxy.cfg"
    cfg.write_text(haproxy_config(env.lab, global_lines, defaults_lines))
    check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise PeerError(f"haproxy rejects {cfg}: {(check.stdout + check.stderr).strip()}")
    group = _one_listener_process(env, "haproxy", ["haproxy", "-db", "-f", str(cfg)],
                                  env.work / "haproxy.log")
    return _on_bridge(env, group, f"{group.threads()} thread(s)")


def _one_listener_process(env: Env, name: str, argv: Sequence[str], log: Path) -> Group:
    """A proxy process in h1 listening on every backend's proxy port (pinned if asked)."""
    group = spawn(env.lab, HOST, name, [*taskset(env.proxy_cpus), *argv], log)
    try:
        for backend in BACKENDS:
            wait_listening(env.lab, HOST, backend.proxy_port, group)
    except BaseException:
        group.stop()
        raise
    return group


def _on_bridge(env: Env, group: Group, note: str) -> Running:
    bridge = env.lab.bridge_ip(1)
    return Running({b.key: (bridge, b.proxy_port) for b in BACKENDS}, [group],
                   _stop_all([group]), note)


def start_socat(env: Env) -> Running:
    bridge, server = env.lab.bridge_ip(1), env.lab.container_ip(1, 1)
    groups: list[Group] = []
    try:
        for b in BACKENDS:
            listen = f"TCP-LISTEN:{b.proxy_port},bind={bridge},fork,reuseaddr"
            groups.append(spawn(env.lab, HOST, f"socat :{b.proxy_port}",
                                [*taskset(env.proxy_cpus), "socat", listen,
                                 f"TCP:{server}:{b.port}"],
                                env.work / f"socat-{b.key}.log"))
            wait_listening(env.lab, HOST, b.proxy_port, groups[-1])
    except BaseException:
        _stop_all(groups)()
        raise
    return Running({b.key: (bridge, b.proxy_port) for b in BACKENDS}, groups,
                   _stop_all(groups), "one process per port, a fork per connection")


def start_minimal_uvloop(env: Env) -> Running:
    """The yardstick for the Python relay: bench/minimal_proxy.py, one process."""
    bridge, server = env.lab.bridge_ip(1), env.lab.container_ip(1, 1)
    pairs = [f"{bridge}:{b.proxy_port}={server}:{b.port}" for b in BACKENDS]
    group = _one_listener_process(env, "minimal uvloop proxy",
                                  [sys.executable, "-m", "bench.minimal_proxy", *pairs],
                                  env.work / "minimal-proxy.log")
    return _on_bridge(env, group, "two uvloop Protocols back to back, nothing else")


def resolve_vip(lab: Lab, service: str) -> str:
    """The VIP c2 gets for ``service`` from the agent's DNS (as any client would)."""
    name = f"{service}.service.consul"
    deadline = time.monotonic() + READY_TIMEOUT
    answer = ""
    while time.monotonic() < deadline:
        answer = lab.exec(CLIENT, ["dig", "+short", "+time=1", "+tries=1", name],
                          capture_output=True, text=True, timeout=10).stdout
        for line in answer.split():
            with contextlib.suppress(ValueError):
                return str(ipaddress.IPv4Address(line))
        time.sleep(0.1)
    raise PeerError(f"dig {name} in c2 gave no address after {READY_TIMEOUT:.0f} s "
                    f"(last answer {answer.strip()!r})")


def start_consulate(env: Env, relay: str, intercept: str = "sk-lookup") -> Running:
    """A real agent in h1; c2 reaches each backend through its service's VIP."""
    agent = LabAgent(env.lab, 1, env.work / "data", env.work / "agent.log",
                     extra_args=["--relay", relay, "--tcp-intercept", intercept])
    try:
        agent.start()
        assert agent.process is not None
        group = Group("consulate agent", agent.process, agent.log_path)
        if env.proxy_cpus:
            group.set_cpus(env.proxy_cpus)
        stats = agent.api("GET", "/v1/agent/self")["Stats"]
        engine = stats["relay"]["engine"]
        if engine != relay:
            raise PeerError(f"asked for --relay {relay} but the agent reports the {engine} "
                            "relay (Stats.relay.engine)")
        if stats["iptables"]["tcp_intercept"] != intercept:
            raise PeerError(f"asked for --tcp-intercept {intercept} but the agent reports "
                            f"{stats['iptables']['tcp_intercept']} (Stats.iptables)")
        targets = {}
        server = env.lab.container_ip(1, 1)
        for b in BACKENDS:
            agent.register(b.service, f"{b.service}-1", server, b.port)
            targets[b.key] = (resolve_vip(env.lab, b.service), b.port)
    except BaseException:
        agent.stop()
        raise
    return Running(targets, [group], agent.stop,
                   f"relay engine {engine}, {group.threads()} thread(s)")


# name -> (what it is, for the report; how to start it)
VARIANTS: dict[str, tuple[str, Callable[[Env], Running]]] = {
    "direct": ("c2 -> c1:port, bridged by h1, no proxy", start_direct),
    "consulate-python": (
        "`consulate agent --relay python`: c2 -> VIP from `dig bench-*.service.consul` "
        "-> BPF sk_lookup -> proxy :10000 -> c1",
        functools.partial(start_consulate, relay="python")),
    "consulate-native": (
        "`consulate agent --relay native` (C splice engine), same path",
        functools.partial(start_consulate, relay="native")),
    "consulate-native-redirect": (
        "`consulate agent --relay native --tcp-intercept redirect`: the VIP reaches the "
        "proxy by iptables REDIRECT (NAT) instead of sk_lookup",
        functools.partial(start_consulate, relay="native", intercept="redirect")),
    "haproxy": ("HAProxy `mode tcp`, defaults", start_haproxy),
    "haproxy-splice": (
        "HAProxy `mode tcp` + `option splice-request` + `option splice-response`",
        functools.partial(start_haproxy,
                          defaults_lines=["option splice-request", "option splice-response"])),
    "haproxy-buf64k": ("HAProxy `mode tcp` + `tune.bufsize 65536`",
                       functools.partial(start_haproxy, global_lines=["tune.bufsize 65536"])),
    "socat": ("`socat TCP-LISTEN:port,fork,reuseaddr TCP:c1:port`", start_socat),
    "uvloop-minimal": ("bench/minimal_proxy.py: a minimal uvloop Protocol proxy, the "
                       "yardstick for the Python relay", start_minimal_uvloop),
}


def check_forwards(lab: Lab, running: Running) -> None:
    """One HTTP request through each HTTP target from c2, retried until READY_TIMEOUT."""
    for key in (HTTP_CLOSE.key, HTTP_KEEPALIVE.key):
        address, port = running.targets[key]
        url = f"http://{address}:{port}/"
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            running.check_alive()
            done = lab.exec(CLIENT, ["wget", "-qO-", "-T", "3", "--tries=1", "--no-proxy", url],
                            capture_output=True, text=True, timeout=10)
            if done.returncode == 0 and done.stdout == "ok\n":
                break
            if time.monotonic() > deadline:
                raise PeerError(f"GET {url} from c2 failed (wget exit {done.returncode}, "
                                f"output {done.stdout[:80]!r})")
            time.sleep(0.1)
