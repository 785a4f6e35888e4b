"""The scheduler API's operations, apart from HTTP: a name and arguments in, a
status and a body out. The HTTP routes call them here when this agent leads, and
forward them to the leader over duplex (``scheduler.api``) when another agent does,
so a job can be submitted to any agent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from consulate.control.scheduler.reconcile import Plan
from consulate.control.scheduler.service import UnknownAllocation, UnknownJob
from consulate.control.scheduler.spec import JobSpecError, parse_job

if TYPE_CHECKING:
    from consulate.control.scheduler.host import SchedulerHost

Reply = tuple[int, Any]  # HTTP status, JSON body (200) or the error's text


def plan_json(plan: Plan, job: str) -> dict[str, object]:
    return {"job": job,
            "placed": [{"id": a.id, "name": a.name, "node": a.node}
                       for a in plan.place if a.job == job],
            "stopped": [a.id for a, _ in plan.stop if a.job == job],
            "unplaced": {g: n for (j, g), n in plan.unplaced.items() if j == job},
            "placement_failures": {g: e.to_json(nodes=False)
                                   for (j, g), e in plan.pending.items() if j == job}}


async def operate(host: SchedulerHost, op: str, arg: Any) -> Reply:
    """Run one operation on this agent's scheduler state."""
    scheduler = host.scheduler
    try:
        if op == "submit":
            text, kind = arg
            job = parse_job(text, format=kind)
            return 200, plan_json(await host.submit(job), job.name)
        if op == "jobs":
            names = sorted({*scheduler.jobs, *scheduler.stopped})
            statuses = [scheduler.job_status(name) for name in names]
            return 200, [{"name": s["name"], "type": s["type"], "status": s["status"]}
                         for s in statuses]
        if op == "job":
            return 200, scheduler.job_status(arg)
        if op == "stop":
            return 200, plan_json(await host.stop(arg), arg)
        if op == "allocation":
            return 200, scheduler.find_allocation(arg).to_json()
        if op == "explain":
            found = scheduler.find_allocation(arg)
            if found.explanation is None:
                return 404, f"allocation {found.short_id} has no explanation"
            return 200, {"id": found.id, "name": found.name, **found.explanation.to_json()}
        if op == "nodes":
            return 200, _nodes(host)
    except JobSpecError as exc:
        return 400, f"invalid job file: {exc}"
    except (UnknownJob, UnknownAllocation) as exc:
        return 404, str(exc)
    return 400, f"unknown scheduler operation {op!r}"


def _nodes(host: SchedulerHost) -> list[dict[str, Any]]:
    used: dict[str, list[int]] = {}
    for allocation in host.scheduler.allocations.values():
        if allocation.desired == "run" and not allocation.terminal:
            totals = used.setdefault(allocation.node, [0, 0, 0])
            totals[0] += allocation.cpu
            totals[1] += allocation.memory
            totals[2] += 1
    return [{**node.to_json(), "allocations": used.get(name, [0, 0, 0])[2],
             "cpu_used": used.get(name, [0, 0, 0])[0],
             "memory_used": used.get(name, [0, 0, 0])[1]}
            for name, node in sorted(host.scheduler.nodes.items())]
