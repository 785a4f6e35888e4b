"""A real etcd server for tests: Debian's etcd-server, one member, on a loopback address.

Each instance gets its own data directory and its own 127.x address, so several
can run at once; it is stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType


class EtcdProcess:
    """``with EtcdProcess(tmp, "127.42.0.1") as etcd: etcd.endpoint``"""

    def __init__(self, work: Path, address: str, name: str = "n1") -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed: run `make test` (apt etcd-server)")
        self.address = address
        self.endpoint = (address, 2379)
        self._work = work
        self._name = name
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> EtcdProcess:
        self._work.mkdir(parents=True, exist_ok=True)
        client, peer = f"http://{self.address}:2379", f"http://{self.address}:2380"
        log = (self._work / "etcd.log").open("wb")
        self._process = subprocess.Popen(
            ["etcd", "--name", self._name, "--data-dir", str(self._work / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"{self._name}={peer}"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"etcd exited: {(self._work / 'etcd.log').read_text()[-2000:]}")
            health = subprocess.run(["etcdctl", "--endpoints", client, "endpoint", "health"],
                                    capture_output=True, env={"ETCDCTL_API": "3"})
            if health.returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd on {client} did not become healthy within 20 s")

    def compact(self) -> None:
        """Compact history up to the current revision (old watch positions become invalid)."""
        out = subprocess.run(
            ["etcdctl", "--endpoints", f"http://{self.address}:2379", "-w", "json", "get", "x"],
            capture_output=True, check=True, env={"ETCDCTL_API": "3"}, text=True).stdout
        revision = json.loads(out)["header"]["revision"]
        subprocess.run(["etcdctl", "--endpoints", f"http://{self.address}:2379", "compact",
                        str(revision)], capture_output=True, check=True, env={"ETCDCTL_API": "3"})

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> EtcdProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

