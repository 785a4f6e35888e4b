"""A real etcd server for the tests, the demo and the benchmarks: Debian's
etcd-server, on a loopback address or as one member of a cluster inside lab
namespaces.

Each instance has its own data directory and address, so several can run at
once; it is stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from consulate.control.procstop import stop_process

if TYPE_CHECKING:
    from consulate.control.lab import Lab

ETCDCTL_ENV = {"ETCDCTL_API": "3"}


class EtcdProcess:
    """``with EtcdProcess(tmp, "127.42.0.1") as etcd: etcd.endpoint``

    ``prefix`` runs etcd and etcdctl through a command such as ``ip netns exec NS``;
    ``cluster`` is etcd's --initial-cluster (name=peer-url,...) for a member.
    """

    def __init__(self, work: Path, address: str, name: str = "n1", *,
                 prefix: Sequence[str] = (), cluster: str | None = None) -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed: run `make test` (apt etcd-server)")
        self.address = address
        self.endpoint = (address, 2379)
        self.client_url = f"http://{address}:2379"
        self.peer_url = f"http://{address}:2380"
        self._work = work
        self._name = name
        self._prefix = list(prefix)
        self._cluster = cluster or f"{name}={self.peer_url}"
        self._process: subprocess.Popen[bytes] | None = None

    def launch(self) -> EtcdProcess:
        """Start the process without waiting (cluster members wait for each other)."""
        self._work.mkdir(parents=True, exist_ok=True)
        with (self._work / "etcd.log").open("ab") as log:
            self._process = subprocess.Popen(
                [*self._prefix, "etcd", "--name", self._name,
                 "--data-dir", str(self._work / "data"),
                 "--listen-client-urls", self.client_url,
                 "--advertise-client-urls", self.client_url,
                 "--listen-peer-urls", self.peer_url,
                 "--initial-advertise-peer-urls", self.peer_url,
                 "--initial-cluster", self._cluster,
                 # A member cut off keeps starting elections; without pre-vote its
                 # higher term deposes the leader when it returns (etcd >= 3.5's default).
                 "--pre-vote"],
                stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_healthy(self, timeout: float = 20) -> EtcdProcess:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"etcd {self._name} exited: "
                                   f"{(self._work / 'etcd.log').read_text()[-2000:]}")
            if self._etcdctl("endpoint", "health").returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd on {self.client_url} not healthy within {timeout} s")

    def start(self) -> EtcdProcess:
        return self.launch().wait_healthy()

    def _etcdctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._prefix, "etcdctl", "--endpoints", self.client_url, *args],
                              capture_output=True, env=ETCDCTL_ENV, text=True, timeout=10)

    def compact(self) -> None:
        """Compact history up to the current revision (old watch positions become invalid)."""
        revision = json.loads(self._etcdctl("-w", "json", "get", "x").stdout)["header"]["revision"]
        self._etcdctl("compact", str(revision)).check_returncode()

    def freeze(self, frozen: bool = True) -> None:
        """Stop (SIGSTOP) or resume (SIGCONT) the member: a hung server whose kernel
        still holds its connections open, which no reset announces to its clients."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    def stop(self) -> None:
        stop_process(self._process)
        self._process = None

    def __enter__(self) -> EtcdProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@dataclass
class LabCluster:
    """An etcd cluster with a member in each of some lab hosts."""

    members: dict[int, EtcdProcess]  # by host number
    registry: str  # the agents' --registry: every member's client address


@contextmanager
def lab_cluster(lab: Lab, work: Path, hosts: Sequence[int]) -> Iterator[LabCluster]:
    """A member in each host's namespace, all healthy; every member stopped on exit."""
    initial = ",".join(f"h{i}=http://{lab.host_ip(i)}:2380" for i in hosts)
    with ExitStack() as stack:
        members = {}
        for i in hosts:
            member = EtcdProcess(work / f"etcd-h{i}", lab.host_ip(i), f"h{i}",
                                 prefix=["ip", "netns", "exec", lab.host_ns(i)],
                                 cluster=initial)
            stack.callback(member.stop)
            members[i] = member.launch()
        for member in members.values():
            member.wait_healthy()
        yield LabCluster(members, "etcd://" + ",".join(f"{lab.host_ip(i)}:2379" for i in hosts))
