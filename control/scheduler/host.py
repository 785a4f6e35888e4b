"""The scheduler's pieces on one agent, composed: the Scheduler state, this host's
node and executor (drivers: exec always, docker when a Docker socket is there),
and the leader candidate. The agent starts it and closes it; the HTTP API reads
and writes through it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from consulate.control.config import AgentConfig
from consulate.control.registrator.agentmode import no_docker_reason
from consulate.control.registrator.docker_source import docker_host
from consulate.control.registry import RegistryBackend
from consulate.control.scheduler.drivers import DockerDriver, Driver, ExecDriver
from consulate.control.scheduler.executor import Executor
from consulate.control.scheduler.nodes import fingerprint
from consulate.control.scheduler.operations import operate
from consulate.control.scheduler.reconcile import Plan
from consulate.control.scheduler.runtime import NODE_TTL, NodeAgent, SchedulerLeader
from consulate.control.scheduler.service import Scheduler
from consulate.control.scheduler.spec import Job
from consulate.control.tasks import cancel_and_wait

log = logging.getLogger("consulate.scheduler")


class SchedulerHost:
    def __init__(self, registry: RegistryBackend, *, node: str, advertise: str,
                 datacenter: str, data_dir: Path, rpc_addr: str = "",
                 docker: str = "", meta: dict[str, str] | None = None,
                 exec_netns: str | None = None, ttl: float = NODE_TTL,
                 reserved_ports: frozenset[int] = frozenset(), http_port: int = 0) -> None:
        """``rpc_addr``: HOST:PORT where this agent's scheduler listens for the other
        agents' duplex connections; "": a unix socket in ``data_dir`` (one host)."""
        self.scheduler = Scheduler()
        host = docker_host(docker)
        drivers: dict[str, Driver] = {"exec": ExecDriver(exec_netns)}
        self.docker: DockerDriver | None = None
        if no_docker_reason(host) is None:
            self.docker = DockerDriver(host)
            drivers["docker"] = self.docker
        self.executor = Executor(drivers)
        found = fingerprint(node, advertise, datacenter=datacenter, meta=meta,
                            docker=self.docker is not None, reserved_ports=reserved_ports)
        self.node_agent = NodeAgent(registry, found, self.executor, ttl=ttl, port=http_port)
        uri = f"tcp://{rpc_addr}" if rpc_addr else f"unix://{data_dir / 'scheduler.sock'}"
        self.leader = SchedulerLeader(registry, self.scheduler, name=node, address=advertise,
                                      rpc_uri=uri, ttl=ttl)
        self.leader.peer.register_function("scheduler.api", self._api)
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def for_agent(cls, registry: RegistryBackend, config: AgentConfig) -> SchedulerHost:
        """The scheduler of ``consulate agent --scheduler``: its node keeps the agent's
        own ports (HTTP, proxy, DNS) from jobs and lives as long as its registrations."""
        ports = (config.http_addr, config.proxy_addr, *config.dns_addrs)
        return cls(registry, node=config.node, advertise=config.advertise,
                   datacenter=config.datacenter, data_dir=config.data_dir,
                   rpc_addr=config.scheduler_rpc_addr, docker=config.docker_host,
                   meta=config.node_meta, exec_netns=config.scheduler_exec_netns or None,
                   ttl=config.liveness_ttl, reserved_ports=frozenset(p for _, p in ports),
                   http_port=config.http_addr[1])

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.leader.run(), name="scheduler-leader"),
                       loop.create_task(self.node_agent.run(), name="scheduler-node")]

    async def close(self) -> None:
        for task in reversed(self._tasks):
            await cancel_and_wait(task)
        await self.executor.close()
        if self.docker is not None:
            self.docker.close()

    def forwarding(self) -> bool:
        """True while another agent leads: API calls go to it."""
        return self.leader.leader_id not in ("", self.leader.instance.id)

    async def _api(self, op: str, arg: Any) -> tuple[int, Any]:
        """``scheduler.api``: an API call another agent forwards to this leader."""
        return await operate(self, op, arg)

    async def submit(self, job: Job) -> Plan:
        """Keep the job in the registry's KV (a new leader finds it) and place it."""
        await self.leader.save_job(job)
        return self.scheduler.submit(job)

    async def stop(self, name: str) -> Plan:
        plan = self.scheduler.stop(name)
        await self.leader.forget_job(name)
        return plan
