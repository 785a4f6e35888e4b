"""Task drivers: how an agent runs one allocation. ``docker`` (a container on the
host's dockerd, which the registrator then registers from its SERVICE_* env) and
``exec`` (a process, in a given network namespace when the agent has one: a lab
container).

A driver starts a task and returns a handle, waits for its exit code, and stops
it. Blocking Docker SDK calls run in threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import docker

STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL, as `docker stop -t 5`


class DriverError(RuntimeError):
    """The driver could not start the task; the message says why (image, command)."""


@dataclass(frozen=True)
class TaskSpec:
    """What an agent needs to run one allocation, as it travels over duplex."""

    alloc_id: str
    name: str  # <job>.<group>[<index>]
    job: str
    driver: str
    image: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # label -> (host, to)
    cpu: int = 100
    memory: int = 300

    def to_json(self) -> dict[str, Any]:
        return {"alloc_id": self.alloc_id, "name": self.name, "job": self.job,
                "driver": self.driver, "image": self.image, "command": self.command,
                "args": list(self.args), "env": dict(self.env), "labels": dict(self.labels),
                "ports": {k: list(v) for k, v in self.ports.items()}, "cpu": self.cpu,
                "memory": self.memory}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> TaskSpec:
        return TaskSpec(alloc_id=data["alloc_id"], name=data["name"], job=data["job"],
                        driver=data["driver"], image=data["image"], command=data["command"],
                        args=tuple(data["args"]), env=dict(data["env"]),
                        labels=dict(data["labels"]),
                        ports={k: (int(v[0]), int(v[1])) for k, v in data["ports"].items()},
                        cpu=int(data["cpu"]), memory=int(data["memory"]))

    def task_env(self) -> dict[str, str]:
        """The job's env plus Nomad's runtime variables (NOMAD_ALLOC_ID, NOMAD_PORT_<label>)."""
        env = {"NOMAD_ALLOC_ID": self.alloc_id, "NOMAD_ALLOC_NAME": self.name,
               "NOMAD_JOB_NAME": self.job}
        for label, (host, to) in self.ports.items():
            env[f"NOMAD_PORT_{label}"] = str(to)
            env[f"NOMAD_HOST_PORT_{label}"] = str(host)
        env.update(self.env)
        return env


class Driver(Protocol):
    name: str

    async def start(self, task: TaskSpec) -> str:
        """Start the task; returns its handle (container id, pid)."""
        ...

    async def wait(self, handle: str) -> int:
        """The task's exit code, once it exits."""
        ...

    async def stop(self, handle: str) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; then forget it."""
        ...


class ExecDriver:
    """Runs the command as a child process of the agent (its own session, so a stop
    reaches its children), inside ``netns`` (``nsenter --net``) when given."""

    name = "exec"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._processes: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, task: TaskSpec) -> str:
        argv = [task.command, *task.args]
        if self.netns:
            argv = ["nsenter", f"--net=/var/run/netns/{self.netns}", "--", *argv]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **task.task_env()},
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise DriverError(f"exec {task.command!r}: {exc.strerror or exc}") from None
        handle = str(process.pid)
        self._processes[handle] = process
        return handle

    async def wait(self, handle: str) -> int:
        return await self._processes[handle].wait()

    async def stop(self, handle: str) -> None:
        process = self._processes.pop(handle, None)
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


class DockerDriver:
    """Runs the task as a container named after the allocation, with its ports
    published on the host and its env (SERVICE_* included) and labels as given."""

    name = "docker"

    def __init__(self, base_url: str) -> None:
        self.client = docker.DockerClient(base_url=base_url, version="auto")

    async def start(self, task: TaskSpec) -> str:
        return await asyncio.to_thread(self._start, task)

    def _start(self, task: TaskSpec) -> str:
        api = self.client.api
        command = [task.command, *task.args] if task.command else None
        name = f"{task.name.replace('[', '-').replace(']', '')}-{task.alloc_id[:8]}"
        try:
            host_config = api.create_host_config(
                port_bindings={f"{to}/tcp": host for host, to in task.ports.values()},
                mem_limit=f"{task.memory}m")
            created = api.create_container(
                task.image, command, name=name, environment=task.task_env(),
                labels={**task.labels, "consulate.alloc_id": task.alloc_id},
                ports=[to for _, to in task.ports.values()], host_config=host_config)
            api.start(created["Id"])
        except docker.errors.DockerException as exc:
            raise DriverError(f"docker run {task.image}: {exc}") from None
        return str(created["Id"])

    async def wait(self, handle: str) -> int:
        result = await asyncio.to_thread(self.client.api.wait, handle)
        return int(result.get("StatusCode", -1))

    async def stop(self, handle: str) -> None:
        await asyncio.to_thread(self._remove, handle)

    def _remove(self, handle: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.stop(handle, timeout=int(STOP_TIMEOUT))
            self.client.api.remove_container(handle, force=True)

    def close(self) -> None:
        self.client.close()
