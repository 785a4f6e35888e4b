"""A lab of network namespaces standing in for hosts and containers.

Layout of a lab named ``consulate-1a2b3c`` with 2 hosts and 2 containers each::

    consulate-1a2b3c-fabric   br0 bridge joining every host's eth0 (10.99.0.0/24)
    consulate-1a2b3c-h1       eth0 10.99.0.11, cbr0 10.100.1.1/24, ip_forward=1
    consulate-1a2b3c-h1c1     eth0 10.100.1.11, default via 10.100.1.1
    ...

Every interface is created directly inside a lab namespace and no namespace has
a route out: the fabric bridge lives in its own namespace, not in the root one,
so a missing iptables rule can never send a packet anywhere real (PLATFORM.md,
"The network rule"). Hosts route to each other's container subnets through the
fabric; containers only know their host.

The lab's shape is saved under ``/run/consulate/lab`` so that another process
(``consulate lab exec/status/down``) can find it; teardown also finds namespaces
by name so that leftovers of crashed runs without a state file can be removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LAB_PREFIX = "consulate-"
STATE_DIR = Path("/run/consulate/lab")
NETNS_ETC = Path("/etc/netns")

# 10.99.0.(10+i) and 10.100.i.(10+j) must stay valid unicast host addresses.
MAX_HOSTS = 244
MAX_CONTAINERS = 244
# How long processes left in a namespace get to exit after SIGTERM.
KILL_GRACE = 1.0

_NAME_RE = re.compile(r"^consulate-[a-z0-9][a-z0-9-]{0,39}$")
_PLACE_RE = re.compile(r"^h(\d+)(?:c(\d+))?$")
# A lab namespace is "<lab>-<place>"; places contain no '-', so the last
# '-' splits a namespace name unambiguously.
_NS_RE = re.compile(r"^(consulate-.+)-(fabric|h\d+(?:c\d+)?)$")


class LabError(RuntimeError):
    """The kernel or iproute2 refused a lab operation (or the lab is missing)."""


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run an iproute2/sysctl command, returning stdout; raise LabError naming it."""
    try:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} not found: run as root with iproute2 installed") from exc
    if proc.returncode != 0:
        shown = " ".join(argv)
        stderr = "; ".join(proc.stderr.strip().splitlines())
        # In batch mode ip reports "Command failed -:N": name that line instead.
        failed = re.search(r"Command failed -:(\d+)", stderr)
        if stdin is not None and failed:
            shown += f" [line {failed.group(1)}: {stdin.splitlines()[int(failed.group(1)) - 1]}]"
        raise LabError(f"`{shown}` failed (exit {proc.returncode}): {stderr or 'no stderr'}")
    return proc.stdout


def _batch(lines: Iterable[str], netns: str | None = None) -> None:
    """Run many ip commands in one process: one fork instead of one per command."""
    text = "".join(line + "\n" for line in lines)
    if text:
        _run(["ip", *(["-n", netns] if netns else []), "-batch", "-"], stdin=text)


def _netns_names() -> list[str]:
    """Names of all existing network namespaces (the first word of each line)."""
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line]


def _lab_of(netns: str) -> str | None:
    match = _NS_RE.match(netns)
    return match.group(1) if match else None


def namespaces_of(name: str) -> list[str]:
    """The existing namespaces of lab ``name``, whether or not it has a state file."""
    return [netns for netns in _netns_names() if _lab_of(netns) == name]


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"lab name {name!r} is invalid: it must start with {LAB_PREFIX!r} followed by "
            "1-40 lowercase letters, digits or '-' (e.g. 'consulate-demo')"
        )


@dataclass(frozen=True)
class Lab:
    """The shape of a lab; every address and namespace name derives from it."""

    name: str
    hosts: int
    containers: int

    def __post_init__(self) -> None:
        _check_name(self.name)

    # -- naming and addressing -------------------------------------------------

    @property
    def fabric_ns(self) -> str:
        return f"{self.name}-fabric"

    def host_ns(self, i: int) -> str:
        return f"{self.name}-h{i}"

    def container_ns(self, i: int, j: int) -> str:
        return f"{self.name}-h{i}c{j}"

    def host_ip(self, i: int) -> str:
        return f"10.99.0.{10 + i}"

    def bridge_ip(self, i: int) -> str:
        """The container gateway of host i, where its agent's DNS listens."""
        return f"10.100.{i}.1"

    def container_ip(self, i: int, j: int) -> str:
        return f"10.100.{i}.{10 + j}"

    def members(self) -> list[tuple[str, str, str]]:
        """(short name, namespace, address) of every namespace, fabric first."""
        rows = [("fabric", self.fabric_ns, "br0 (10.99.0.0/24)")]
        for i in range(1, self.hosts + 1):
            rows.append((f"h{i}", self.host_ns(i),
                         f"{self.host_ip(i)}, cbr0 {self.bridge_ip(i)}/24"))
            rows += [(f"h{i}c{j}", self.container_ns(i, j), self.container_ip(i, j))
                     for j in range(1, self.containers + 1)]
        return rows

    def namespaces(self) -> list[str]:
        return [netns for _, netns, _ in self.members()]

    def ns(self, where: str) -> str:
        """Map a short name ("fabric", "h1", "h1c2") to its namespace name."""
        if where == "fabric":
            return self.fabric_ns
        match = _PLACE_RE.match(where)
        if match:
            i, j = int(match.group(1)), match.group(2)
            if 1 <= i <= self.hosts and j is None:
                return self.host_ns(i)
            if 1 <= i <= self.hosts and j is not None and 1 <= int(j) <= self.containers:
                return self.container_ns(i, int(j))
        raise ValueError(
            f"no place {where!r} in lab {self.name}: it has hosts h1..h{self.hosts}, each "
            f"with containers c1..c{self.containers} (use e.g. 'h1', 'h1c1' or 'fabric')"
        )

    # -- running things inside -------------------------------------------------

    def exec(
        self,
        where: str,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float | None = None,
        **kw: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run(argv) inside a lab namespace.

        Goes through ``ip netns exec`` so that the namespace's resolv.conf is
        bind-mounted over /etc/resolv.conf. Extra keywords go to subprocess.run
        (e.g. ``capture_output=True, text=True``).
        """
        cmd = ["ip", "netns", "exec", self.ns(where), *argv]
        return subprocess.run(cmd, check=check, timeout=timeout, **kw)

    def popen(self, where: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a long-running process inside a lab namespace.

        It gets its own session (process group) unless told otherwise, so the
        caller can stop it and its children with os.killpg; down() kills
        whatever is still in the namespace anyway.
        """
        kw.setdefault("start_new_session", True)
        return subprocess.Popen(["ip", "netns", "exec", self.ns(where), *argv], **kw)

    # -- state -----------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return STATE_DIR / f"{self.name}.json"

    def save(self) -> None:
        """Write the lab's shape atomically so readers never see half a file."""
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self)) + "\n")
        tmp.replace(self.state_path)

    @classmethod
    def load(cls, name: str) -> Lab:
        """The lab saved under this name; LabError if there is none."""
        _check_name(name)
        path = STATE_DIR / f"{name}.json"
        try:
            data = json.loads(path.read_text())
            return cls(name=data["name"], hosts=int(data["hosts"]),
                       containers=int(data["containers"]))
        except FileNotFoundError:
            raise LabError(
                f"no lab named {name} (no {path}); list labs with `consulate lab status`"
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise LabError(f"corrupt lab state {path}: {exc}; remove it with "
                           f"`consulate lab down {name}`") from exc

    # -- teardown --------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    def down(self) -> None:
        """Remove the lab; idempotent and safe on half-built or crashed labs.

        Besides the namespaces its shape implies, removes any existing
        namespace named after the lab, so a Lab(name, 0, 0) cleans up a lab
        whose shape is unknown.
        """
        existing = namespaces_of(self.name)
        _stop_pids(pid for netns in existing for pid in _netns_pids(netns))
        if existing:
            _batch(f"netns del {netns}" for netns in existing)
        for netns in {*self.namespaces(), *existing}:
            shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)
        self.state_path.unlink(missing_ok=True)


def _netns_pids(netns: str) -> list[int]:
    try:
        return [int(p) for p in _run(["ip", "netns", "pids", netns]).split()]
    except LabError:  # the namespace vanished meanwhile: nothing to kill
        return []


def _stop_pids(pids: Iterable[int]) -> None:
    """SIGTERM, then SIGKILL what is still there after KILL_GRACE; by PID only.

    A process counts as gone once /proc/PID/ns/net disappears, which already
    holds for a zombie that its parent has not reaped yet.
    """
    alive = set(pids) - {os.getpid()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + KILL_GRACE
        while alive and time.monotonic() < deadline:
            alive = {p for p in alive if _in_some_netns(p)}
            if alive:
                time.sleep(0.02)
        if not alive:
            return


def _in_some_netns(pid: int) -> bool:
    # readlink, not lstat: the link of a zombie still lstats but no longer resolves.
    try:
        os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    return True


def _build_commands(lab: Lab) -> tuple[list[str], dict[str, list[str]]]:
    """Root-namespace ip commands (namespaces, veths) and per-namespace ones."""
    hosts = range(1, lab.hosts + 1)
    conts = range(1, lab.containers + 1)
    # Each veth is created with both ends already in their namespaces, so no
    # interface ever exists in the root namespace, not even for a moment.
    root = [f"netns add {netns}" for netns in lab.namespaces()]
    root += [f"link add eth0 netns {lab.host_ns(i)} type veth peer name h{i} "
             f"netns {lab.fabric_ns}" for i in hosts]
    root += [f"link add eth0 netns {lab.container_ns(i, j)} type veth peer name c{j} "
             f"netns {lab.host_ns(i)}" for i in hosts for j in conts]

    per_ns = {lab.fabric_ns: ["link add br0 type bridge", "link set br0 up"]}
    per_ns[lab.fabric_ns] += [f"link set h{i} master br0 up" for i in hosts]
    for i in hosts:
        per_ns[lab.host_ns(i)] = [
            "link set lo up",
            f"addr add {lab.host_ip(i)}/24 dev eth0",
            "link set eth0 up",
            "link add cbr0 type bridge",
            f"addr add {lab.bridge_ip(i)}/24 dev cbr0",
            "link set cbr0 up",
            *(f"link set c{j} master cbr0 up" for j in conts),
            *(f"route add 10.100.{k}.0/24 via {lab.host_ip(k)}" for k in hosts if k != i),
        ]
        for j in conts:
            per_ns[lab.container_ns(i, j)] = [
                "link set lo up",
                f"addr add {lab.container_ip(i, j)}/24 dev eth0",
                "link set eth0 up",
                f"route add default via {lab.bridge_ip(i)}",
            ]
    return root, per_ns


def up(hosts: int = 1, containers: int = 3, name: str | None = None) -> Lab:
    """Build a lab and save its state; on any failure remove what was built."""
    if not 1 <= hosts <= MAX_HOSTS:
        raise ValueError(f"hosts={hosts} is out of range: use 1..{MAX_HOSTS}")
    if not 0 <= containers <= MAX_CONTAINERS:
        raise ValueError(f"containers={containers} is out of range: use 0..{MAX_CONTAINERS}")
    lab = Lab(name or LAB_PREFIX + os.urandom(3).hex(), hosts, containers)
    # Refuse before touching anything: tearing down on this error would
    # destroy a lab that is not ours.
    if lab.state_path.exists() or namespaces_of(lab.name):
        raise LabError(f"lab {lab.name} already exists: remove it with "
                       f"`consulate lab down {lab.name}` or pick another name")
    try:
        root, per_ns = _build_commands(lab)
        _batch(root)
        for netns, lines in per_ns.items():
            _batch(lines, netns)
        for i in range(1, hosts + 1):
            _run(["ip", "netns", "exec", lab.host_ns(i),
                  "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            for j in range(1, containers + 1):
                etc = NETNS_ETC / lab.container_ns(i, j)
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "resolv.conf").write_text(
                    f"nameserver {lab.bridge_ip(i)}\nsearch service.consul\n"
                    "options timeout:2 attempts:2\n"
                )
        lab.save()
    except BaseException:
        lab.down()
        raise
    return lab


load = Lab.load


def down(name: str) -> bool:
    """Remove the lab with this name, with or without a state file.

    Returns whether there was anything to remove.
    """
    _check_name(name)
    found = name in list_labs()
    try:
        lab = Lab.load(name)
    except LabError:  # no or corrupt state file: down() finds the namespaces by name
        lab = Lab(name, 0, 0)
    lab.down()
    return found


def list_labs() -> list[str]:
    """Names of labs with a state file or with namespaces left (crashed runs)."""
    names = {p.stem for p in STATE_DIR.glob(f"{LAB_PREFIX}*.json")}
    names |= {lab for lab in map(_lab_of, _netns_names()) if lab}
    return sorted(names)


def down_all(prefix: str = LAB_PREFIX) -> list[str]:
    """Remove every lab whose name starts with prefix; return their names.

    The default removes all labs on the machine, including those of other
    test runs: pass a narrower prefix when other runs may be live.
    """
    if not prefix.startswith(LAB_PREFIX):
        raise ValueError(f"prefix {prefix!r} must start with {LAB_PREFIX!r}")
    removed = [name for name in list_labs() if name.startswith(prefix)]
    for name in removed:
        down(name)
    return removed
