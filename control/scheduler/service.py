"""The scheduler's state: jobs, nodes and allocations, evaluated after every change.

Synchronous and I/O-free: the HTTP API, the node watcher and the drivers call
in, and read the plans that come out (what to start, what to stop). Evaluation
is cheap (a few milliseconds at 1,000 nodes), so it runs on every change rather
than through an evaluation queue as Nomad's does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from consulate.control.scheduler.alloc import Allocation, HistoryEntry
from consulate.control.scheduler.explain import Explanation
from consulate.control.scheduler.nodes import Node
from consulate.control.scheduler.rebalance import REBALANCE_INTERVAL, pick_move
from consulate.control.scheduler.reconcile import Plan, reconcile
from consulate.control.scheduler.spec import Job

log = logging.getLogger("consulate.scheduler")

SUMMARY_COLUMNS = ("queued", "starting", "running", "failed", "complete", "lost")
GC_AGE = 3600.0  # seconds a finished allocation is kept (Nomad collects them after an hour)
_SUMMARY_OF = {"pending": "starting", "running": "running", "restarting": "running",
               "failed": "failed", "complete": "complete", "lost": "lost"}


class UnknownJob(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f'No job(s) with prefix or id "{name}" found: list them with '
                         "GET /v1/jobs")


class UnknownAllocation(LookupError):
    """No allocation, or more than one, has the id prefix the caller gave."""


class Scheduler:
    def __init__(self, *, rng: np.random.Generator | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.jobs: dict[str, Job] = {}
        self.stopped: dict[str, Job] = {}
        self.submitted: dict[str, float] = {}
        self.nodes: dict[str, Node] = {}
        self.allocations: dict[str, Allocation] = {}
        self.pending: dict[tuple[str, str], Explanation] = {}
        self.unplaced: dict[tuple[str, str], int] = {}
        self.rng = rng or np.random.default_rng()
        self.clock = clock
        self.listeners: list[Callable[[Plan], None]] = []
        self.rebalancing: dict[str, float] = {}  # job -> time of its last move
        self.changed: set[str] = set()  # allocations changed since the leader last saved
        self.collected: set[str] = set()  # allocations forgotten since the leader last saved

    # -- desired state -------------------------------------------------------------

    def submit(self, job: Job) -> Plan:
        self.jobs[job.name] = job
        self.stopped.pop(job.name, None)
        self.submitted[job.name] = self.clock()
        log.info("event=job-submitted job=%s type=%s groups=%d", job.name, job.type,
                 len(job.groups))
        return self.evaluate()

    def stop(self, name: str) -> Plan:
        job = self.jobs.pop(name, None)
        if job is None:
            raise UnknownJob(name)
        self.stopped[name] = job
        log.info("event=job-stopped job=%s", name)
        return self.evaluate()

    def restore(self, jobs: list[Job], allocations: list[Allocation]) -> Plan:
        """Take over the state the leaders saved (it replaces what this one held: it
        may be stale from an earlier term), then evaluate once."""
        self.allocations = {a.id: a for a in allocations}
        self.jobs = {job.name: job for job in jobs}
        self.stopped = {}
        for job in jobs:
            self.submitted.setdefault(job.name, self.clock())
        return self.evaluate()

    # -- actual state ---------------------------------------------------------------

    def node_up(self, node: Node) -> Plan:
        known = self.nodes.get(node.name)
        self.nodes[node.name] = node
        if known != node:
            log.info("event=node-up node=%s cpu=%d memory=%d", node.name, node.cpu, node.memory)
        if known is None:  # a node joined: the jobs that opted in may rebalance onto it
            for name, job in self.jobs.items():
                if job.rebalance:
                    self.rebalancing.setdefault(name, float("-inf"))
        return self.evaluate()

    def node_down(self, name: str, reason: str = "missed its heartbeat TTL") -> Plan:
        if self.nodes.pop(name, None) is not None:
            log.info("event=node-down node=%s reason=%r", name, reason)
        return self.evaluate(lost_reason=f"node {name} {reason}")

    def report(self, allocation_id: str, status: str, detail: str, restarts: int = 0) -> Plan:
        """An agent's word on an allocation's client status."""
        allocation = self.allocations[allocation_id]
        self.changed.add(allocation_id)
        allocation.restarts = max(allocation.restarts, restarts)
        if allocation.status == status:  # another restart, or a replayed report
            if not allocation.history or allocation.history[-1].detail != detail:
                allocation.history.append(HistoryEntry(self.clock(), status, detail))
        else:
            allocation.move(status, detail, self.clock())
            log.info("event=alloc-status alloc=%s job=%s node=%s status=%s detail=%r",
                     allocation.short_id, allocation.job, allocation.node, status, detail)
        return self.evaluate()

    # -- evaluation -----------------------------------------------------------------

    def _rebalance(self, now: float) -> None:
        """At most one move per job and REBALANCE_INTERVAL, until it is balanced."""
        for name, last in list(self.rebalancing.items()):
            job = self.jobs.get(name)
            if job is None:
                del self.rebalancing[name]
                continue
            if now - last < REBALANCE_INTERVAL:
                continue
            move = pick_move(job, self.allocations.values(), self.nodes.values())
            if move is None:
                del self.rebalancing[name]
                continue
            allocation, reason = move
            self.changed.add(allocation.id)
            allocation.desired = "stop"
            allocation.history.append(HistoryEntry(now, allocation.status, f"stop: {reason}"))
            self.rebalancing[name] = now
            log.info("event=alloc-rebalanced alloc=%s job=%s node=%s reason=%r",
                     allocation.short_id, name, allocation.node, reason)

    def _collect(self, now: float) -> None:
        """Forget allocations that ended GC_AGE ago, and stopped jobs left without any."""
        for allocation in list(self.allocations.values()):
            if allocation.terminal and allocation.history and \
                    now - allocation.history[-1].at >= GC_AGE:
                del self.allocations[allocation.id]
                self.collected.add(allocation.id)
        held = {a.job for a in self.allocations.values()}
        for name in [n for n in self.stopped if n not in held]:
            del self.stopped[name]
            self.submitted.pop(name, None)

    def evaluate(self, lost_reason: str = "its node left") -> Plan:
        now = self.clock()
        self._collect(now)
        self._rebalance(now)
        plan = reconcile(self.jobs, self.allocations.values(), self.nodes.values(), now=now,
                         rng=self.rng)
        self.changed.update(a.id for a in (*plan.lost, *plan.place, *(a for a, _ in plan.stop)))
        for allocation in plan.lost:
            allocation.move("lost", lost_reason, now)
        for allocation, reason in plan.stop:
            allocation.desired = "stop"
            allocation.history.append(HistoryEntry(now, allocation.status, f"stop: {reason}"))
        for allocation in plan.place:
            self.allocations[allocation.id] = allocation
            detail = f"placed on {allocation.node}"
            if allocation.previous:
                detail += f", replacing {allocation.previous[:8]}"
            allocation.history.append(HistoryEntry(now, "pending", detail))
            log.info("event=alloc-placed alloc=%s name=%s node=%s", allocation.short_id,
                     allocation.name, allocation.node)
        for key, explanation in plan.pending.items():  # once per new or changed failure
            known = self.pending.get(key)
            if known is None or known.filtered() != explanation.filtered() or \
                    self.unplaced.get(key) != plan.unplaced[key]:
                log.info("event=placement-failed job=%s group=%s unplaced=%d filtered=%r",
                         *key, plan.unplaced[key], explanation.filtered())
        self.pending = plan.pending
        self.unplaced = plan.unplaced
        if not plan.empty:
            for listener in self.listeners:
                listener(plan)
        return plan

    # -- reading --------------------------------------------------------------------

    def job(self, name: str) -> Job:
        job = self.jobs.get(name) or self.stopped.get(name)
        if job is None:
            raise UnknownJob(name)
        return job

    def job_allocations(self, name: str) -> list[Allocation]:
        return sorted((a for a in self.allocations.values() if a.job == name),
                      key=lambda a: (a.group, a.index, a.history[0].at if a.history else 0))

    def job_status(self, name: str) -> dict[str, Any]:
        """What ``nomad job status`` shows, as JSON."""
        job = self.job(name)
        allocations = self.job_allocations(name)
        summary = {g.name: dict.fromkeys(SUMMARY_COLUMNS, 0) for g in job.groups}
        for allocation in allocations:
            if allocation.group in summary:
                summary[allocation.group][_SUMMARY_OF[allocation.status]] += 1
        failures = {}
        for group in job.groups:
            key = (name, group.name)
            if key in self.unplaced and name in self.jobs:
                summary[group.name]["queued"] = self.unplaced[key]
                failures[group.name] = self.pending[key].to_json(nodes=False)
        return {"name": name, "type": job.type, "strategy": job.strategy,
                "status": self._status(name, summary), "submitted": self.submitted.get(name),
                "summary": summary, "placement_failures": failures,
                "allocations": [a.to_json() for a in allocations]}

    def _status(self, name: str, summary: dict[str, dict[str, int]]) -> str:
        if name not in self.jobs:
            return "dead"
        if any(s["running"] or s["starting"] for s in summary.values()):
            return "running"
        return "pending"

    def find_allocation(self, prefix: str) -> Allocation:
        found = [a for a in self.allocations.values() if a.id.startswith(prefix)]
        if len(found) != 1:
            raise UnknownAllocation(
                f'No allocation(s) with prefix or id "{prefix}" found' if not found else
                f'Prefix "{prefix}" matched {len(found)} allocations: give more of the id')
        return found[0]
