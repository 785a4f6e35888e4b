"""The scheduler on the mesh: nodes registered in the registry, one leader elected
through it, allocations started and reported over duplex RPC.

- Every agent runs a :class:`NodeAgent`: it registers its node as an instance of
  ``consulate-node`` with a TTL (liveness comes from the registry: a host cut off
  stops heartbeating and its node expires), follows the scheduler leader, dials
  its duplex endpoint, serves ``alloc.start`` / ``alloc.stop`` and streams every
  allocation's status to it (``scheduler.events``, the latest state first, and a
  heartbeat every third of the TTL: the leader also takes a node whose stream
  fell silent for a TTL as down).
- Every agent also runs a :class:`SchedulerLeader` candidate: an instance of
  ``consulate-scheduler`` whose meta names its duplex endpoint. The oldest live
  candidate leads (the registry's leader rule); the leader loads the jobs from
  the KV store (``consulate/scheduler/jobs/<name>``) and the allocations the
  previous leader saved (``consulate/scheduler/allocs/<id>``, kept current once a
  second), follows the nodes, and reconciles in a loop: start what is pending,
  stop what should stop, replace what was lost, once a second and after every
  change. A new leader thus takes over running allocations instead of restarting
  them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, replace
from typing import Any, TypeVar

from consulate.control import duplex
from consulate.control.registry import (
    Instance,
    RegistryBackend,
    RegistryError,
    UnknownInstance,
)
from consulate.control.scheduler.alloc import Allocation, IllegalTransition
from consulate.control.scheduler.drivers import TaskSpec
from consulate.control.scheduler.executor import Executor
from consulate.control.scheduler.nodes import NODE_SERVICE, Node
from consulate.control.scheduler.reconcile import Plan
from consulate.control.scheduler.service import Scheduler
from consulate.control.scheduler.spec import Job, JobSpecError, RestartPolicy, job_from_dict
from consulate.control.tasks import cancel_and_wait

log = logging.getLogger("consulate.scheduler.runtime")
T = TypeVar("T")

LEADER_SERVICE = "consulate-scheduler"
JOBS_PREFIX = "consulate/scheduler/jobs/"
ALLOCS_PREFIX = "consulate/scheduler/allocs/"
NODE_TTL = 10.0
TICK = 1.0  # seconds between reconciliation passes
CALL_TIMEOUT = 10.0


def task_for(job: Job, allocation: Allocation) -> TaskSpec:
    group = job.group(allocation.group)
    ports = {p.label: (allocation.ports[p.label], p.to or allocation.ports[p.label])
             for p in group.ports}
    return TaskSpec(allocation.id, allocation.name, job.name, group.driver, group.image,
                    group.command, group.args, group.env, group.labels, ports, group.cpu,
                    group.memory)


async def _heartbeat(registry: RegistryBackend, instance: Instance, ttl: float) -> None:
    """Keep ``instance`` registered: renew every third of the TTL, register it again
    when the registry lost it (after an outage)."""
    while True:
        try:
            try:
                await registry.heartbeat(instance.id)
            except UnknownInstance:
                await registry.register(instance)
        except RegistryError as exc:
            log.warning("event=heartbeat-failed id=%s error=%s", instance.id, exc)
        await asyncio.sleep(ttl / 3)


async def leader(registry: RegistryBackend) -> Instance | None:
    """The oldest live scheduler candidate: the leader."""
    candidates, _ = await registry.instances(LEADER_SERVICE)
    return min(candidates, key=lambda i: (i.create_index, i.id)) if candidates else None


async def leader_endpoint(registry: RegistryBackend) -> str | None:
    """The leader's duplex endpoint."""
    found = await leader(registry)
    return None if found is None else found.meta.get("rpc")


async def _register(registry: RegistryBackend, instance: Instance) -> None:
    """Register, retrying while the registry cannot be reached."""
    while True:
        try:
            await registry.register(instance)
            return
        except RegistryError as exc:
            log.warning("event=register-failed id=%s error=%s", instance.id, exc)
            await asyncio.sleep(TICK)


class NodeAgent:
    """This host as a node of the scheduler (see the module docstring)."""

    def __init__(self, registry: RegistryBackend, node: Node, executor: Executor, *,
                 ttl: float = NODE_TTL, port: int = 0) -> None:
        """``port``: the agent's HTTP API port, the node instance's port in the catalog
        (as Nomad registers ``nomad-client``)."""
        self.registry, self.node, self.executor, self.ttl = registry, node, executor, ttl
        self.peer = duplex.RPCPeer(node.name)
        self.peer.register_function("alloc.start", self._start)
        self.peer.register_function("alloc.stop", self.executor.stop)
        self.instance = Instance(id=f"node-{node.name}", name=NODE_SERVICE,
                                 address=node.address, port=port, meta=node.to_meta(),
                                 ttl=ttl, node=node.name)

    def _start(self, task: dict[str, Any], restart: dict[str, Any], batch: bool) -> bool:
        self.executor.start(TaskSpec.from_json(task), RestartPolicy(**restart), batch)
        return True

    async def run(self) -> None:
        await _register(self.registry, self.instance)
        log.info("event=node-registered node=%s cpu=%d memory=%d drivers=%s", self.node.name,
                 self.node.cpu, self.node.memory, ",".join(self.node.drivers))
        heartbeat = asyncio.get_running_loop().create_task(
            _heartbeat(self.registry, self.instance, self.ttl))
        reporter: asyncio.Task[None] | None = None
        following: str | None = None
        try:
            while True:
                try:
                    current = await leader_endpoint(self.registry)
                except RegistryError as exc:
                    log.warning("event=leader-unknown node=%s error=%s", self.node.name, exc)
                    current = following
                if current != following:
                    if reporter is not None:
                        await cancel_and_wait(reporter)
                        reporter = None
                    if following is not None:
                        await self.peer.disconnect(following)
                    following = current
                    if following is not None:
                        log.info("event=follow-leader node=%s leader=%s", self.node.name,
                                 following)
                        await self.peer.connect(following)
                        reporter = asyncio.get_running_loop().create_task(self._report())
                await asyncio.sleep(TICK)
        finally:
            for task in (reporter, heartbeat):
                if task is not None:
                    await cancel_and_wait(task)
            await self.peer.shutdown()
            with contextlib.suppress(RegistryError):
                await self.registry.deregister(self.instance.id)

    async def _report(self) -> None:
        """Stream every allocation's status to the leader; again after a break."""
        while True:
            try:
                await self.peer.wait_for_peers(1)
                await self.peer.send_stream("scheduler.events", self._events())
            except duplex.DuplexError as exc:
                log.warning("event=report-broken node=%s error=%s", self.node.name, exc)
            await asyncio.sleep(TICK)

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        yield {"node": self.node.name}
        async for event in self.executor.events(idle=self.ttl / 3):
            yield {"heartbeat": True} if event is None else event.to_json()


class SchedulerLeader:
    """A scheduler candidate; while it leads, it drives the Scheduler (see above)."""

    def __init__(self, registry: RegistryBackend, scheduler: Scheduler, *, name: str,
                 address: str, rpc_uri: str, ttl: float = NODE_TTL) -> None:
        self.registry, self.scheduler, self.ttl = registry, scheduler, ttl
        self.rpc_uri = rpc_uri
        self.leader_id = ""  # the leading candidate, as last read
        self.peer = duplex.RPCPeer(f"scheduler-{name}")
        self.peer.register_function("scheduler.events", self._events)
        self.instance = Instance(id=f"scheduler-{name}", name=LEADER_SERVICE, address=address,
                                 port=0, meta={}, ttl=ttl, node=name)
        self.leading = False
        self._wake = asyncio.Event()
        self._started: set[str] = set()  # allocations an agent acknowledged
        self._inflight: dict[str, asyncio.Task[None]] = {}  # allocation id -> its call
        # When each node's status stream last spoke (its heartbeats come every third
        # of its TTL): a node cut off is down one TTL after, even while a registry
        # that just changed leaders still holds its lease.
        self.last_seen: dict[str, float] = {}
        scheduler.listeners.append(self._on_plan)

    async def run(self) -> None:
        bound = await self.peer.bind(self.rpc_uri)
        port = int(bound.rpartition(":")[2]) if bound.startswith("tcp://") else 0
        self.instance = replace(self.instance, port=port, meta={"rpc": bound})
        await _register(self.registry, self.instance)
        heartbeat = asyncio.get_running_loop().create_task(
            _heartbeat(self.registry, self.instance, self.ttl))
        try:
            while True:
                try:
                    await self._tick()
                except RegistryError as exc:  # cut off from the registry: lead no more
                    log.warning("event=tick-failed scheduler=%s error=%s", self.instance.id,
                                exc)
                    self.leading = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            for call in list(self._inflight.values()):
                await cancel_and_wait(call)
            await cancel_and_wait(heartbeat)
            await self.peer.shutdown()
            with contextlib.suppress(RegistryError):
                await self.registry.deregister(self.instance.id)

    async def _tick(self) -> None:
        current = await leader(self.registry)
        self.leader_id = "" if current is None else current.id
        leading = self.leader_id == self.instance.id
        if not leading:
            self.leading = False
            return
        await self._follow_nodes()
        if not self.leading:  # nodes first: what runs on them is not lost
            log.info("event=leader-elected scheduler=%s", self.instance.id)
            await self._take_over()
            self.leading = True
        self.scheduler.evaluate()
        self._push()
        await self._save_allocations()

    async def _take_over(self) -> None:
        """Load the jobs and allocations a previous leader saved in the KV store."""
        jobs = await self._saved(JOBS_PREFIX, job_from_dict)
        allocations = await self._saved(ALLOCS_PREFIX, Allocation.from_json)
        self.scheduler.restore(jobs, allocations)
        log.info("event=state-restored jobs=%d allocations=%d", len(jobs), len(allocations))

    async def _saved(self, prefix: str, parse: Callable[[Any], T]) -> list[T]:
        entries, _ = await self.registry.kv_list(prefix)
        found = []
        for entry in entries:
            try:
                found.append(parse(json.loads(entry.value)))
            except (JobSpecError, ValueError, KeyError, TypeError) as exc:
                log.warning("event=state-unreadable key=%s error=%s", entry.key, exc)
        return found

    async def _save_allocations(self) -> None:
        """Write the allocations changed since the last pass, for the next leader, and
        delete those collected."""
        changed, self.scheduler.changed = self.scheduler.changed, set()
        collected, self.scheduler.collected = self.scheduler.collected, set()
        for alloc_id in sorted(collected):
            await self.registry.kv_delete(ALLOCS_PREFIX + alloc_id)
        for alloc_id in sorted(changed - collected):
            allocation = self.scheduler.allocations.get(alloc_id)
            if allocation is not None:
                await self.registry.kv_put(ALLOCS_PREFIX + alloc_id,
                                           json.dumps(allocation.to_json()).encode())

    async def save_job(self, job: Job) -> None:
        await self.registry.kv_put(JOBS_PREFIX + job.name,
                                   json.dumps(dict(job.source)).encode())

    async def forget_job(self, name: str) -> None:
        await self.registry.kv_delete(JOBS_PREFIX + name)

    async def _follow_nodes(self) -> None:
        instances, _ = await self.registry.instances(NODE_SERVICE)
        live: dict[str, Node] = {}
        now = time.monotonic()
        for instance in instances:
            name = instance.node or instance.id
            seen = self.last_seen.get(name)
            if seen is not None and now - seen > (instance.ttl or self.ttl):
                continue  # silent on its stream for a whole TTL: down, whatever the registry
            try:
                live[name] = Node.from_meta(instance.meta)
            except ValueError as exc:
                log.warning("event=node-unreadable id=%s error=%s", instance.id, exc)
        for name in set(self.scheduler.nodes) - set(live):
            self.scheduler.node_down(name)
        for node in live.values():
            if self.scheduler.nodes.get(node.name) != node:
                self.scheduler.node_up(node)

    def _on_plan(self, plan: Plan) -> None:
        self._wake.set()

    def _push(self) -> None:
        """Start what is pending and not yet acknowledged; stop what should stop. One
        call in flight per allocation, each in its own task: a node that stopped
        answering delays nothing else."""
        for allocation in list(self.scheduler.allocations.values()):
            if allocation.terminal or allocation.node not in self.scheduler.nodes or \
                    allocation.id in self._inflight:
                continue
            if allocation.desired == "stop":
                if allocation.id in self._started or allocation.status != "pending":
                    self._send(allocation, "alloc.stop", allocation.id)
                else:  # never sent to its node: nothing runs
                    self.scheduler.report(allocation.id, "complete",
                                          "stopped before it started")
            elif allocation.status == "pending" and allocation.id not in self._started:
                job = self.scheduler.job(allocation.job)
                self._send(allocation, "alloc.start", task_for(job, allocation).to_json(),
                           asdict(job.restart), job.type == "batch")

    def _send(self, allocation: Allocation, method: str, *args: Any) -> None:
        async def call() -> None:
            try:
                await self.peer.call(method, *args, peer=allocation.node, timeout=CALL_TIMEOUT)
                if method == "alloc.start":
                    self._started.add(allocation.id)
            except (duplex.DuplexError, TimeoutError) as exc:
                log.debug("event=push-deferred alloc=%s node=%s method=%s error=%s",
                          allocation.short_id, allocation.node, method, exc)
            finally:
                self._inflight.pop(allocation.id, None)

        self._inflight[allocation.id] = asyncio.get_running_loop().create_task(call())

    @duplex.stream_input
    async def _events(self, items: AsyncIterator[dict[str, Any]]) -> bool:
        node = ""
        async for item in items:
            if "node" in item:
                node = str(item["node"])
            if node:
                self.last_seen[node] = time.monotonic()
            if "alloc_id" not in item:  # the greeting, or a heartbeat
                continue
            alloc_id = str(item["alloc_id"])
            known = self.scheduler.allocations.get(alloc_id)
            if known is None or known.terminal:
                if item["status"] in ("running", "restarting"):  # an orphan: stop it
                    with contextlib.suppress(duplex.DuplexError, TimeoutError):
                        await self.peer.call("alloc.stop", alloc_id, peer=node,
                                             timeout=CALL_TIMEOUT)
                continue
            try:
                self.scheduler.report(alloc_id, str(item["status"]), str(item["detail"]),
                                      int(item["restarts"]))
            except IllegalTransition as exc:
                log.warning("event=report-refused node=%s error=%s", node, exc)
        return True
