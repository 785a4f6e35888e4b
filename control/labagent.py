"""Agents and helper processes inside lab hosts: shared by the tests, the demo and bench/.

An agent runs as a real ``consulate agent`` process in a host namespace, with its
DNS on the host's container bridge (port 53) as well as on loopback, and is
stopped by its PID (SIGTERM, the same path as Ctrl-C).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from consulate.control.lab import Lab

AGENT_START_TIMEOUT = 15.0


class AgentStartError(RuntimeError):
    """The agent process exited or did not answer in time; carries its log."""


@dataclass
class LabAgent:
    """A ``consulate agent`` process running in one lab host."""

    lab: Lab
    host: int
    data_dir: Path
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    token: str = ""  # given to the agent with --token and sent with every API call
    launcher: list[str] = field(default_factory=list)  # a command the agent runs under
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def where(self) -> str:
        return f"h{self.host}"

    def start(self, *, ready: bool = True) -> LabAgent:
        """Start the agent; wait until it is ready (``ready=False``: until it answers)."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        argv = [
            *self.launcher, sys.executable, "-m", "consulate.control.cli", "agent",
            "--data-dir", str(self.data_dir),
            "--node", f"h{self.host}",
            "--advertise", self.lab.bridge_ip(self.host),
            "--dns-addr", f"127.0.0.1:8600,{self.lab.bridge_ip(self.host)}:53",
            *(["--token", self.token] if self.token else []),
            *self.extra_args,
        ]
        self.process = self.lab.popen(self.where, argv, stdout=self._log, stderr=self._log)
        try:
            self.wait_ready(answering_is_enough=not ready)
        except AgentStartError:
            self.stop()  # an agent that did not start keeps neither a process nor its log open
            raise
        return self

    def wait_ready(self, *, answering_is_enough: bool = False) -> None:
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AgentStartError(
                    f"agent in {self.where} exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                if self.api("GET", "/v1/agent/self")["Stats"]["agent"]["ready"] or \
                        answering_is_enough:
                    return
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            time.sleep(0.05)
        raise AgentStartError(f"agent in {self.where} not ready after "
                              f"{AGENT_START_TIMEOUT}s:\n{self.log()}")

    def api(self, method: str, path: str, body: object = None) -> Any:
        """Call the agent's HTTP API from inside its host (127.0.0.1:8500 there)."""
        script = (
            "import sys,urllib.request as u\n"
            "d=sys.stdin.buffer.read() or None\n"
            "h={'X-Consul-Token':sys.argv[3]} if sys.argv[3] else {}\n"
            "r=u.Request(sys.argv[1],data=d,method=sys.argv[2],headers=h)\n"
            "sys.stdout.buffer.write(u.urlopen(r,timeout=5).read())\n"
        )
        done = self.lab.exec(
            self.where, [sys.executable, "-c", script, f"http://127.0.0.1:8500{path}", method,
                         self.token],
            input=json.dumps(body).encode() if body is not None else b"",
            capture_output=True, timeout=15,
        )
        if done.returncode != 0:
            raise OSError(f"{method} {path} in {self.where} failed: "
                          f"{done.stderr.decode(errors='replace').strip()}")
        return json.loads(done.stdout) if done.stdout else None

    def register(self, name: str, instance_id: str, address: str, port: int) -> None:
        self.api("PUT", "/v1/agent/service/register",
                 {"ID": instance_id, "Name": name, "Address": address, "Port": port})

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM by PID and wait: the agent removes its rules on the way out."""
        code = 0
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                code = self.process.wait()
        elif self.process is not None:
            code = self.process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
