"""The DNS benchmark's servers: consulate, dnsmasq and unbound serving one service set.

The service set is made up here (``svc0000`` ... with 1-3 instances each) and
registered into a real ``consulate agent``; the agent's VIPs are read back from
its HTTP API so that dnsmasq (``host-record`` / ``srv-host``) and unbound
(``local-zone: "consul." static`` + ``local-data``) serve the very same answers:

- ``<svc>.service.consul A``          -> the service's VIP
- ``_<svc>._tcp.service.consul SRV``  -> one record per instance (port, target),
  the target named as Consul names an instance's own address
  (``<hex address>.addr.<dc>.consul``) with an A record of its own.

Every server is checked once per query mix before it is measured
(``check_answers``): a server that answers anything else than the service set
says ("wrong answers") is reported as such, never measured.

Every address is on 127.0.0.0/8: the instance addresses are only data, nothing
ever connects to them. Processes run in their own session (``peers.Group``) and
are stopped by their process group id.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dnslib import QTYPE, RCODE, DNSRecord

from bench.peers import Group, PeerError, taskset

READY_TIMEOUT = 20.0  # seconds for a server to answer, or the agent to hold every route
DATACENTER = "dc1"
SRV_PRIORITY = SRV_WEIGHT = 1  # what Consul answers


@dataclass(frozen=True)
class Instance:
    id: str
    address: str
    port: int

    @property
    def target(self) -> str:
        """The SRV target, as Consul names an instance with an address of its own."""
        return f"{ipaddress.IPv4Address(self.address).packed.hex()}.addr.{DATACENTER}.consul"


@dataclass
class Service:
    name: str
    instances: list[Instance]
    vip: str = ""  # filled in from the agent

    @property
    def a_name(self) -> str:
        return f"{self.name}.service.consul"

    @property
    def srv_name(self) -> str:
        return f"_{self.name}._tcp.service.consul"


def service_set(count: int) -> list[Service]:
    """``count`` services with 1, 2 or 3 instances in turn: 127.100-102.x.y, distinct
    addresses (so distinct SRV targets) and ports."""
    return [Service(f"svc{i:04d}", [Instance(f"svc{i:04d}-{j + 1}",
                                             f"127.{100 + j}.{i // 256}.{i % 256}",
                                             20000 + 1000 * j + i % 1000)
                                    for j in range(1 + i % 3)])
            for i in range(count)]


# -- query mixes ---------------------------------------------------------------------

MIXES: dict[str, str] = {
    "a": "A only: `<svc>.service.consul A` for every service in turn",
    "a+srv": "A and SRV alternating: `<svc>.service.consul A`, "
             "`_<svc>._tcp.service.consul SRV`, for every service in turn",
}


def queries(services: Sequence[Service], mix: str) -> list[tuple[str, str]]:
    """(name, type) in the order the load generators send them (they loop over it)."""
    out: list[tuple[str, str]] = []
    for service in services:
        out.append((service.a_name, "A"))
        if mix == "a+srv":
            out.append((service.srv_name, "SRV"))
    return out


def write_queries(services: Sequence[Service], mix: str, path: Path) -> Path:
    """dnsperf's data file: one ``name TYPE`` a line."""
    path.write_text("".join(f"{name} {qtype}\n" for name, qtype in queries(services, mix)))
    return path


# -- asking a server -------------------------------------------------------------------


class Resolver:
    """One UDP socket asking one server, for checks and freshness polls (not load)."""

    def __init__(self, address: str, port: int) -> None:
        self.server = (address, port)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.connect(self.server)

    def close(self) -> None:
        self._sock.close()

    def ask(self, name: str, qtype: str, timeout: float = 1.0) -> DNSRecord:
        """The reply to one query, retried once; raises PeerError if none comes."""
        query = DNSRecord.question(name, qtype)
        query.header.rd = 0
        packet = query.pack()
        for _ in range(2):
            self._sock.settimeout(timeout)
            self._sock.send(packet)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    data = self._sock.recv(65535)
                except TimeoutError:
                    break
                except ConnectionRefusedError:  # nothing listens (yet): ICMP port unreachable
                    time.sleep(min(0.05, timeout))
                    break
                reply = DNSRecord.parse(data)
                if reply.header.id == query.header.id:
                    return reply
        raise PeerError(f"no answer from {self.server[0]}:{self.server[1]} to {name} {qtype}")


def rcode_name(reply: DNSRecord) -> str:
    return str(RCODE.get(reply.header.rcode))


def a_addresses(reply: DNSRecord) -> list[str]:
    return sorted(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A)


def _srv_endpoints(resolver: Resolver, reply: DNSRecord) -> list[tuple[str, int]]:
    """(address, port) of each SRV record, the address from the glue in the additional
    section, or else by asking the same server for the target's A record."""
    glue = {str(rr.rname).lower(): str(rr.rdata) for rr in reply.ar if rr.rtype == QTYPE.A}
    out = []
    for rr in reply.rr:
        if rr.rtype != QTYPE.SRV:
            continue
        target = str(rr.rdata.target).lower()
        address = glue.get(target)
        if address is None:
            found = a_addresses(resolver.ask(target, "A"))
            address = found[0] if len(found) == 1 else f"{len(found)} addresses"
        out.append((address, int(rr.rdata.port)))
    return sorted(out)


@dataclass
class AnswerCheck:
    """What one server answered to every query of a mix."""

    wrong: list[str] = field(default_factory=list)  # one line per wrong answer
    replies: int = 0
    reply_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.wrong

    @property
    def mean_reply_bytes(self) -> float:
        return self.reply_bytes / self.replies if self.replies else 0.0

    def summary(self) -> str:
        if self.ok:
            return f"all {self.replies} answers right"
        return (f"wrong answers: {len(self.wrong)} of {self.replies}, e.g. "
                + "; ".join(self.wrong[:2]))


def check_answers(address: str, port: int, services: Sequence[Service], mix: str) -> AnswerCheck:
    """Ask every query of the mix once and compare with the service set: NOERROR, the
    VIP alone for A; for SRV one record per instance, ports and target addresses
    equal to the instances'."""
    by_name = {s.a_name: s for s in services} | {s.srv_name: s for s in services}
    result = AnswerCheck()
    resolver = Resolver(address, port)
    try:
        for name, qtype in queries(services, mix):
            reply = resolver.ask(name, qtype)
            result.replies += 1
            result.reply_bytes += len(reply.pack())
            service = by_name[name]
            got: object
            if qtype == "A":
                want: object = ["NOERROR", [service.vip]]
                got = [rcode_name(reply), a_addresses(reply)]
            else:
                want = ["NOERROR", sorted((i.address, i.port) for i in service.instances)]
                got = [rcode_name(reply), _srv_endpoints(resolver, reply)]
            if got != want:
                result.wrong.append(f"{name} {qtype}: got {got}, want {want}")
    finally:
        resolver.close()
    return result


def wait_answering(address: str, port: int, group: Group) -> None:
    """Until the server answers a query at all (any rcode); fails if it died."""
    deadline = time.monotonic() + READY_TIMEOUT
    resolver = Resolver(address, port)
    try:
        while True:
            group.check_alive()
            try:
                resolver.ask("ready.invalid", "A", timeout=0.2)
                return
            except PeerError:
                if time.monotonic() > deadline:
                    raise PeerError(f"{group.name} does not answer on {address}:{port} after "
                                    f"{READY_TIMEOUT:.0f} s: {group.log_tail()}") from None
    finally:
        resolver.close()


# -- the servers -------------------------------------------------------------------------


@dataclass
class Server:
    """A running DNS server: where it listens and its process group."""

    name: str
    address: str
    port: int
    group: Group
    note: str = ""

    def stop(self) -> None:
        self.group.stop()


def spawn(name: str, argv: Sequence[str], log_path: Path) -> Group:
    """Start argv in a session of its own (own process group), output in log_path."""
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    return Group(name, popen, log_path)


def free_port(address: str) -> int:
    """A port free for both UDP and TCP on address (the agent's HTTP API is TCP)."""
    for _ in range(50):
        port = random.randint(20000, 59999)
        try:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        return port
    raise PeerError(f"no free port found on {address}")


class Agent:
    """A ``consulate agent`` (no iptables, temporary data dir) and its HTTP API."""

    def __init__(self, python: str, address: str, work: Path, cpus: set[int]) -> None:
        self.address = address
        self.dns_port = free_port(address)
        self.http_port = free_port(address)
        proxy_port = free_port(address)
        argv = [*taskset(cpus), python, "-m", "consulate.control.cli", "agent",
                "--no-iptables", "--data-dir", str(work / "agent-data"), "--node", "bench",
                "--datacenter", DATACENTER, "--advertise", address,
                "--dns-addr", f"{address}:{self.dns_port}",
                "--http-addr", f"{address}:{self.http_port}",
                "--proxy-addr", f"{address}:{proxy_port}",
                # bench.watchers holds thousands of long polls from one address
                "--http-max-conns-per-client", "0"]
        self.group = spawn("consulate agent", argv, work / "agent.log")
        self._conn: http.client.HTTPConnection | None = None

    def api(self, method: str, path: str, body: object = None) -> object:
        """One call on a kept-alive connection (reopened once if the agent closed it)."""
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.address, self.http_port, timeout=10)
            try:
                self._conn.request(method, path, body=data)
                response = self._conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
                continue
            if response.status != 200:
                raise PeerError(f"{method} {path}: HTTP {response.status} "
                                f"{raw.decode(errors='replace').strip()[:200]}")
            return json.loads(raw) if raw else None
        raise AssertionError("unreachable")

    def routes(self) -> dict[str, dict[str, object]]:
        info = self.api("GET", "/v1/agent/self")
        assert isinstance(info, dict)
        services: dict[str, dict[str, object]] = info["Stats"]["routes"]["services"]
        return services

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            self.group.check_alive()
            with contextlib.suppress(OSError, http.client.HTTPException, PeerError, ValueError):
                info = self.api("GET", "/v1/agent/self")
                if isinstance(info, dict) and info["Stats"]["agent"]["ready"]:
                    return
            if time.monotonic() > deadline:
                raise PeerError(f"consulate agent not ready after {READY_TIMEOUT:.0f} s: "
                                f"{self.group.log_tail()}")
            time.sleep(0.05)

    def register(self, instance: Instance, service: str) -> None:
        self.api("PUT", "/v1/agent/service/register",
                 {"ID": instance.id, "Name": service, "Address": instance.address,
                  "Port": instance.port})

    def deregister(self, instance_id: str) -> None:
        self.api("PUT", f"/v1/agent/service/deregister/{instance_id}")

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.group.stop()


def start_consulate(python: str, address: str, work: Path, cpus: set[int],
                    services: Sequence[Service]) -> tuple[Server, Agent, float]:
    """The agent with every service registered, each service's VIP read back from
    ``GET /v1/agent/self`` into ``services``; also returns the seconds registering took."""
    agent = Agent(python, address, work, cpus)
    try:
        agent.wait_ready()
        started = time.monotonic()
        for service in services:
            for instance in service.instances:
                agent.register(instance, service.name)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            routes = agent.routes()
            missing = [s.name for s in services if s.name not in routes]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise PeerError(f"the agent's route table lacks {len(missing)} services "
                                f"({missing[0]}, ...) {READY_TIMEOUT:.0f} s after registering")
            time.sleep(0.05)
        registering = time.monotonic() - started
        for service in services:
            service.vip = str(routes[service.name]["vip"])
        server = Server("consulate", address, agent.dns_port, agent.group)
        wait_answering(address, agent.dns_port, agent.group)
    except BaseException:
        agent.stop()
        raise
    server.note = f"{agent.group.threads()} thread(s) after start"
    return server, agent, registering


def _targets(services: Sequence[Service]) -> Iterator[Instance]:
    for service in services:
        yield from service.instances


def dnsmasq_config(address: str, port: int, work: Path, services: Sequence[Service]) -> str:
    """Answers from ``host-record`` and ``srv-host`` only, never forwarding: ``local=``
    makes any other name under consul. NXDOMAIN."""
    lines = [f"port={port}", f"listen-address={address}", "bind-interfaces", "no-resolv",
             "no-hosts", "local=/consul/", "local-ttl=0", "cache-size=10000",
             f"log-facility={work / 'dnsmasq.log'}", "pid-file=", "user=nobody",
             "group=nogroup"]
    for service in services:
        lines.append(f"host-record={service.a_name},{service.vip},0")
        lines += [f"srv-host={service.srv_name},{i.target},{i.port},{SRV_PRIORITY},{SRV_WEIGHT}"
                  for i in service.instances]
    lines += [f"host-record={i.target},{i.address},0" for i in _targets(services)]
    return "\n".join(lines) + "\n"


def unbound_config(address: str, port: int, work: Path, services: Sequence[Service]) -> str:
    """One thread, no chroot, no privilege drop, iterator only (no DNSSEC validation),
    and the whole consul. zone as ``local-data`` in a static local zone."""
    data = []
    for service in services:
        data.append(f"{service.a_name}. 0 IN A {service.vip}")
        data += [f"{service.srv_name}. 0 IN SRV {SRV_PRIORITY} {SRV_WEIGHT} {i.port} {i.target}."
                 for i in service.instances]
    data += [f"{i.target}. 0 IN A {i.address}" for i in _targets(services)]
    local_data = "".join(f'    local-data: "{record}"\n' for record in data)
    return f"""\
server:
    interface: {address}@{port}
    port: {port}
    num-threads: 1
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{work}"
    pidfile: "{work / 'unbound.pid'}"
    use-syslog: no
    logfile: ""
    verbosity: 0
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    local-zone: "consul." static
{local_data}remote-control:
    control-enable: no
"""


def _start_peer(name: str, address: str, port: int, argv: Sequence[str],
                work: Path, cpus: set[int]) -> Server:
    group = spawn(name, [*taskset(cpus), *argv], work / f"{name}.out")
    try:
        wait_answering(address, port, group)
    except BaseException:
        group.stop()
        raise
    return Server(name, address, port, group)


def start_dnsmasq(address: str, work: Path, cpus: set[int],
                  services: Sequence[Service]) -> Server:
    port = free_port(address)
    conf = work / "dnsmasq.conf"
    conf.write_text(dnsmasq_config(address, port, work, services))
    check = subprocess.run(["dnsmasq", "--test", f"--conf-file={conf}"], capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise PeerError(f"dnsmasq rejects {conf}: {(check.stdout + check.stderr).strip()}")
    return _start_peer("dnsmasq", address, port,
                       ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}"], work, cpus)


def start_unbound(address: str, work: Path, cpus: set[int],
                  services: Sequence[Service]) -> Server:
    port = free_port(address)
    conf = work / "unbound.conf"
    conf.write_text(unbound_config(address, port, work, services))
    check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise PeerError(f"unbound rejects {conf}: {(check.stdout + check.stderr).strip()}")
    return _start_peer("unbound", address, port, ["unbound", "-d", "-c", str(conf)], work, cpus)


# name -> (what it is, for the report; how to start it from the service set)
PeerStart = Callable[[str, Path, set[int], Sequence[Service]], Server]
PEERS: dict[str, tuple[str, PeerStart]] = {
    "dnsmasq": ("dnsmasq, `host-record` + `srv-host` from the service set, `--no-resolv`, "
                "`local=/consul/`, TTL 0, one process", start_dnsmasq),
    "unbound": ('unbound, `local-zone: "consul." static` + `local-data` from the service set, '
                "`num-threads: 1`, `module-config: iterator`, TTL 0", start_unbound),
}
