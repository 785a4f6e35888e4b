"""A real dockerd inside a lab host, with a busybox image: shared by the tests and bench/.

dockerd runs in the host's network namespace (entered with nsenter, which keeps
the cgroup mounts that ``ip netns exec`` would hide), so its bridge, its
iptables rules and every container stay inside the lab. Its data, exec root,
socket and containerd namespace are its own, under a work directory; it is
stopped by its PID. No image registry is reachable, so the image is imported
from a tarball of Debian's busybox-static (PLATFORM.md).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors

from consulate.control.lab import Lab

IMAGE = "busybox:local"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "httpd", "nc", "wget", "sleep", "cat", "echo", "mkdir", "true", "false")
START_TIMEOUT = 20.0
# A container's PID 1 ignores SIGTERM (busybox sleep, httpd): stopping it, or
# dockerd, would wait Docker's default 10 s before SIGKILL. These bound the waits.
STOP_TIMEOUT = 1
SHUTDOWN_TIMEOUT = 2


class DockerStartError(RuntimeError):
    """dockerd exited or did not answer in time; carries its log."""


@functools.cache
def busybox_image_tar() -> bytes:
    """A root filesystem with busybox and a few applets, as ``docker import`` takes it."""
    if not BUSYBOX.exists():
        raise DockerStartError(f"{BUSYBOX} is missing: install Debian's busybox-static")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(str(BUSYBOX), arcname="bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return buffer.getvalue()


@dataclass
class LabDocker:
    """One dockerd in lab host ``h<host>``; ``client`` is a docker SDK client of it."""

    lab: Lab
    host: int
    work: Path
    process: subprocess.Popen[bytes] | None = None
    client: docker.DockerClient | None = None
    daemon_args: tuple[str, ...] = ()  # more dockerd flags, e.g. ("--live-restore",)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.work / "docker.sock"

    @property
    def url(self) -> str:
        """Its DOCKER_HOST."""
        return f"unix://{self.socket}"

    def start(self) -> LabDocker:
        if shutil.which("dockerd") is None:
            raise DockerStartError("dockerd not found: install Debian's docker.io")
        self.work.mkdir(parents=True, exist_ok=True)
        self._log = open(self.work / "dockerd.log", "ab")  # noqa: SIM115 (closed in stop)
        namespace = f"{self.lab.host_ns(self.host)}"
        self.process = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{namespace}", "dockerd",
             "--storage-driver=vfs", "--data-root", str(self.work / "data"),
             "--exec-root", str(self.work / "exec"), "--pidfile", str(self.work / "docker.pid"),
             "-H", self.url, "--containerd-namespace", namespace,
             "--containerd-plugins-namespace", f"{namespace}-plugins",
             "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), *self.daemon_args],
            stdout=self._log, stderr=self._log, start_new_session=True)
        self._wait_ready()
        self.client = docker.DockerClient(base_url=self.url, version="auto")
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DockerStartError(f"dockerd exited with {self.process.returncode}:\n"
                                       f"{self.log()[-3000:]}")
            if self._pings():
                return
            time.sleep(0.05)
        raise DockerStartError(f"dockerd not answering at {self.url} after {START_TIMEOUT}s:\n"
                               f"{self.log()[-3000:]}")

    def _pings(self) -> bool:
        """GET /_ping on the socket. By hand: the SDK leaks the socket of a refused
        connection, and the socket file appears before dockerd accepts on it."""
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(2)
            try:
                probe.connect(str(self.socket))
                probe.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                return probe.recv(4096).startswith(b"HTTP/1.0 200")
            except OSError:
                return False

    def import_image(self, tarball: bytes, *tags: str) -> None:
        """Import the busybox tarball as IMAGE, tagged also as each of ``tags``."""
        api = self.api
        api.import_image_from_data(tarball, repository=IMAGE.split(":")[0],
                                   tag=IMAGE.split(":")[1])
        for tag in tags:
            repository, _, version = tag.partition(":")
            api.tag(IMAGE, repository, version or "latest")

    @property
    def api(self) -> docker.APIClient:
        assert self.client is not None, "dockerd is not running"
        return self.client.api

    def run(self, name: str, command: list[str], *, image: str = IMAGE,
            publish: dict[str, Any] | None = None, expose: list[str] | None = None,
            env: dict[str, str] | None = None, labels: dict[str, str] | None = None,
            restart: str = "") -> str:
        """Create and start a container, ``docker run -d`` style; returns its id.

        ``publish`` maps "80/tcp" to a host port (None: a random one), ``expose``
        lists ports exposed but not published ("53/udp").
        """
        ports = [_port_spec(p) for p in [*(publish or {}), *(expose or [])]]
        host_config = self.api.create_host_config(
            port_bindings=dict(publish or {}),
            restart_policy={"Name": restart} if restart else None)
        created = self.api.create_container(
            image, command, name=name, ports=ports, environment=env, labels=labels,
            host_config=host_config, stop_timeout=STOP_TIMEOUT)
        self.api.start(created["Id"])
        return str(created["Id"])

    def remove_all(self) -> None:
        for item in self.api.containers(all=True, quiet=True):
            self.api.remove_container(item["Id"], force=True)

    def stop(self, *, remove_containers: bool = True) -> None:
        """SIGTERM dockerd by PID and wait (it stops its containers and containerd),
        then SIGKILL whatever of its process group is left.

        Containers are removed first unless told otherwise (a dockerd restart):
        faster than letting the shutdown kill them.
        """
        if self.client is not None:
            if remove_containers:
                with contextlib.suppress(docker.errors.DockerException):
                    self.remove_all()
            self.client.close()
            self.client = None
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if remove_containers:
            self._unmount_data_root()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _unmount_data_root(self) -> None:
        """dockerd bind-mounts its data root on itself; with --live-restore it leaves
        that mount behind when it exits (for the containers it would leave running),
        and the work directory could not be removed."""
        data_root = str(self.work / "data")
        with open("/proc/self/mounts") as mounts:
            mounted = any(line.split()[1] == data_root for line in mounts)
        if mounted:
            subprocess.run(["umount", data_root], check=True)

    def log(self) -> str:
        path = self.work / "dockerd.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _port_spec(key: str) -> int | tuple[int, str]:
    """"80/tcp" -> 80 and "53/udp" -> (53, "udp"), as the SDK takes ports."""
    number, _, proto = key.partition("/")
    return int(number) if proto in ("", "tcp") else (int(number), proto)
