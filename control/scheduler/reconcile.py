"""Reconciliation: from the desired state (jobs) and the actual one (allocations,
nodes) to a plan: what to place, what to stop, what was lost.

Pure: the caller owns the state and applies the plan. Run it again and again; a
plan is empty once the two states agree.

- An allocation on a node that left is lost, and replaced (same index) elsewhere.
- A failed allocation is replaced as the job's reschedule policy allows, after
  its delay (doubling per attempt up to ``max_delay``, as Nomad's exponential).
- Service and batch groups keep ``count`` allocations (a batch allocation that
  completed counts as done); system groups one on every feasible node.
- Allocations of jobs no longer wanted, of groups removed or changed (their
  replacements run the new definition, all at once: there is no rolling update),
  and extra ones, are stopped.
- Whatever cannot be placed stays pending, with the explanation of the failure.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from consulate.control.scheduler.alloc import Allocation
from consulate.control.scheduler.cluster import Cluster, holds_resources
from consulate.control.scheduler.explain import Explanation
from consulate.control.scheduler.nodes import Node
from consulate.control.scheduler.placement import GroupPlacer, Placed
from consulate.control.scheduler.spec import Group, Job


@dataclass
class Plan:
    place: list[Allocation] = field(default_factory=list)
    stop: list[tuple[Allocation, str]] = field(default_factory=list)
    lost: list[Allocation] = field(default_factory=list)
    pending: dict[tuple[str, str], Explanation] = field(default_factory=dict)
    unplaced: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.place or self.stop or self.lost)


def reschedule_due(failed: Allocation, job: Job, attempt: int, now: float) -> bool:
    """Whether the ``attempt``-th replacement of ``failed`` may start at ``now``."""
    policy = job.reschedule
    if not policy.unlimited and attempt > policy.attempts:
        return False
    failed_at = failed.history[-1].at if failed.history else now
    delay = min(policy.delay * 2.0 ** (attempt - 1), policy.max_delay)
    return now >= failed_at + delay


def reconcile(jobs: Mapping[str, Job], allocations: Iterable[Allocation],
              nodes: Iterable[Node], *, now: float | None = None,
              rng: np.random.Generator | None = None) -> Plan:
    now = time.time() if now is None else now
    plan = Plan()
    node_list = list(nodes)
    present = {n.name for n in node_list}
    every = list(allocations)
    live: list[Allocation] = []
    for allocation in every:
        if not holds_resources(allocation):
            continue
        if allocation.node not in present:
            plan.lost.append(allocation)
        elif (outdated := _outdated(allocation, jobs)) is not None:
            plan.stop.append((allocation, outdated))
        else:
            live.append(allocation)
    cluster = Cluster(node_list, live)
    replaced = {a.previous for a in every if a.previous}
    for name in sorted(jobs):
        job = jobs[name]
        for group in job.groups:
            mine = [a for a in live if a.job == name and a.group == group.name]
            placer = GroupPlacer(cluster, job, group, rng=rng)
            if job.type == "system":
                _reconcile_system(plan, cluster, placer, job, group, mine)
                continue
            done = {a.index for a in every if a.job == name and a.group == group.name
                    and a.status == "complete" and job.type == "batch"}
            due, waiting = _failed(every, job, group, replaced, now)
            _reconcile_count(plan, cluster, placer, job, group, mine, done | waiting, due)
    return plan


def _outdated(allocation: Allocation, jobs: Mapping[str, Job]) -> str | None:
    """Why an allocation should no longer run, if it should not."""
    job = jobs.get(allocation.job)
    if job is None:
        return "job stopped"
    group = next((g for g in job.groups if g.name == allocation.group), None)
    if group is None:
        return f"group {allocation.group} removed from the job"
    if allocation.version != group.version:
        return "job updated: the group's definition changed"
    return None


def _failed(every: list[Allocation], job: Job, group: Group, replaced: set[str],
            now: float) -> tuple[dict[int, Allocation], set[int]]:
    """Failed allocations not yet replaced, by index: those whose replacement may
    start now, and the indexes that wait (for their delay, or for good when the
    policy's attempts are spent)."""
    by_id = {a.id: a for a in every}
    due: dict[int, Allocation] = {}
    waiting: set[int] = set()
    for allocation in every:
        if (allocation.job, allocation.group) != (job.name, group.name) or \
                allocation.status != "failed" or allocation.id in replaced:
            continue
        attempt, walk = 1, allocation
        while walk.previous in by_id:
            walk = by_id[walk.previous]
            attempt += 1
        if reschedule_due(allocation, job, attempt, now):
            due[allocation.index] = allocation
        else:
            waiting.add(allocation.index)
    return due, waiting


def _reconcile_count(plan: Plan, cluster: Cluster, placer: GroupPlacer, job: Job,
                     group: Group, mine: list[Allocation], done: set[int],
                     failed: dict[int, Allocation]) -> None:
    running = sorted(mine, key=lambda a: a.index)
    for extra in running[group.count:] if len(running) > group.count else []:
        plan.stop.append((extra, f"count lowered to {group.count}"))
        cluster.remove(extra)
    used = {a.index for a in running[:group.count]} | done
    lost = {a.index: a for a in plan.lost if (a.job, a.group) == (job.name, group.name)}
    missing = [i for i in range(group.count) if i not in used]
    for index in missing:
        previous = lost.get(index) or failed.get(index)
        outcome = placer.place()
        if isinstance(outcome, Explanation):
            plan.pending[(job.name, group.name)] = outcome
            plan.unplaced[(job.name, group.name)] = len(missing) - missing.index(index)
            return
        _keep(plan, cluster, job, group, index, outcome, previous)


def _reconcile_system(plan: Plan, cluster: Cluster, placer: GroupPlacer, job: Job,
                      group: Group, mine: list[Allocation]) -> None:
    covered = {a.node for a in mine}
    for position, node in enumerate(cluster.names):
        if node in covered:
            continue
        outcome = placer.place(only=position)
        if isinstance(outcome, Placed):
            lost = next((a for a in plan.lost if a.node == node and a.job == job.name), None)
            _keep(plan, cluster, job, group, position, outcome, lost)


def _keep(plan: Plan, cluster: Cluster, job: Job, group: Group, index: int,
          placed: Placed, previous: Allocation | None) -> None:
    allocation = Allocation(job.name, group.name, index, placed.node, group.cpu, group.memory,
                            placed.ports, explanation=placed.explanation,
                            previous=previous.id if previous else "", version=group.version)
    cluster.add(allocation)
    plan.place.append(allocation)
