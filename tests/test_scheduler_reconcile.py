"""The scheduler's state through node loss, failures, count changes, stops and jobs
that cannot be placed (driven through Scheduler, with a clock the test moves)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from consulate.control.scheduler.alloc import IllegalTransition
from consulate.control.scheduler.nodes import Node
from consulate.control.scheduler.service import Scheduler, UnknownJob
from consulate.control.scheduler.spec import Job, job_from_dict


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def job(name: str = "web", count: int = 4, **extra: Any) -> Job:
    group = {"name": "g", "count": count, "driver": "exec", "config": {"command": "sleep"},
             "resources": {"cpu": 100, "memory": 100}}
    return job_from_dict({"name": name, "strategy": "spread", "groups": [group], **extra})


@pytest.fixture
def scheduler() -> Scheduler:
    running = Scheduler(clock=Clock())
    for name in ("h1", "h2", "h3"):
        running.node_up(Node(name, 1000, 1000))
    return running


def where(scheduler: Scheduler, job: str = "web") -> Counter[str]:
    return Counter(a.node for a in scheduler.job_allocations(job)
                   if a.desired == "run" and not a.terminal)


def test_lost_node_allocations_are_replaced_elsewhere(scheduler: Scheduler) -> None:
    scheduler.submit(job())
    assert where(scheduler) == {"h1": 2, "h2": 1, "h3": 1}
    gone = [a for a in scheduler.job_allocations("web") if a.node == "h1"]
    plan = scheduler.node_down("h1")
    assert [a.status for a in gone] == ["lost", "lost"]
    assert gone[0].history[-1].detail == "node h1 missed its heartbeat TTL"
    assert where(scheduler) == {"h2": 2, "h3": 2}
    assert sorted((a.index, a.previous) for a in plan.place) == sorted(
        (a.index, a.id) for a in gone)
    assert scheduler.evaluate().empty  # converged


def test_failed_allocation_is_rescheduled_after_its_delay(scheduler: Scheduler) -> None:
    clock = scheduler.clock
    assert isinstance(clock, Clock)
    scheduler.submit(job(count=1, reschedule={"delay": "10s", "max_delay": "15s"}))
    [first] = scheduler.job_allocations("web")
    scheduler.report(first.id, "running", "started")
    scheduler.report(first.id, "failed", "exit status 1")
    assert scheduler.evaluate().place == []  # the delay has not passed
    clock.now += 10
    [second] = scheduler.evaluate().place
    assert second.previous == first.id
    scheduler.report(second.id, "failed", "exit status 1")
    clock.now += 14  # the second attempt waits twice as long, capped at max_delay: 15 s
    assert scheduler.evaluate().place == []
    clock.now += 1
    [third] = scheduler.evaluate().place
    assert third.previous == second.id


def test_reschedule_attempts_run_out(scheduler: Scheduler) -> None:
    scheduler.submit(job(count=1, reschedule={"delay": "1s", "attempts": 1,
                                              "unlimited": False}))
    [first] = scheduler.job_allocations("web")
    scheduler.report(first.id, "failed", "exit status 1")
    scheduler.clock.now += 1  # type: ignore[attr-defined]
    [second] = scheduler.evaluate().place
    scheduler.report(second.id, "failed", "exit status 1")
    scheduler.clock.now += 100  # type: ignore[attr-defined]
    assert scheduler.evaluate().place == []
    assert scheduler.job_status("web")["summary"]["g"]["failed"] == 2


def test_count_down_and_stop(scheduler: Scheduler) -> None:
    scheduler.submit(job(count=4))
    plan = scheduler.submit(job(count=2))
    assert sorted(a.index for a, _ in plan.stop) == [2, 3]
    assert {reason for _, reason in plan.stop} == {"count lowered to 2"}
    plan = scheduler.stop("web")
    assert sorted(a.index for a, _ in plan.stop) == [0, 1]
    assert scheduler.job_status("web")["status"] == "dead"
    with pytest.raises(UnknownJob, match=r'No job\(s\) with prefix or id "nope" found'):
        scheduler.stop("nope")


def test_batch_allocations_that_completed_are_done(scheduler: Scheduler) -> None:
    scheduler.submit(job(count=2, type="batch"))
    for allocation in scheduler.job_allocations("web"):
        scheduler.report(allocation.id, "running", "started")
        scheduler.report(allocation.id, "complete", "exit status 0")
    assert scheduler.evaluate().empty
    assert scheduler.job_status("web")["summary"]["g"]["complete"] == 2


def test_unplaceable_job_stays_pending_and_disturbs_nothing(scheduler: Scheduler) -> None:
    scheduler.submit(job("web", count=3))
    before = {a.id: (a.node, a.status, a.desired) for a in scheduler.allocations.values()}
    windows = [{"attribute": "${attr.kernel.name}", "value": "windows"}]
    plan = scheduler.submit(job("win", count=2, constraints=windows))
    assert plan.place == [] and plan.stop == []
    assert {a.id: (a.node, a.status, a.desired)
            for a in scheduler.allocations.values()} == before
    status = scheduler.job_status("win")
    assert status["status"] == "pending"
    assert status["summary"]["g"]["queued"] == 2
    assert status["placement_failures"]["g"]["filtered"] == {
        "constraint ${attr.kernel.name} = windows not met: the attribute is not set": 3}
    # a node that meets it arrives: the pending job is placed on it
    scheduler.node_up(Node("w1", 1000, 1000, attributes={"kernel.name": "windows"}))
    assert where(scheduler, "win") == {"w1": 2}
    assert scheduler.job_status("win")["placement_failures"] == {}


def test_lifecycle_table_refuses_illegal_moves(scheduler: Scheduler) -> None:
    scheduler.submit(job(count=1))
    [allocation] = scheduler.job_allocations("web")
    allocation.move("running", "started", 1.0)
    allocation.move("complete", "exit status 0", 2.0)
    with pytest.raises(IllegalTransition, match="complete -> running is not a legal move"):
        allocation.move("running", "again", 3.0)
    assert [(h.status, h.detail) for h in allocation.history] == [
        ("pending", "placed on h1"), ("running", "started"), ("complete", "exit status 0")]


def test_rebalancing_is_opt_in_and_rate_limited(scheduler: Scheduler) -> None:
    clock = scheduler.clock
    assert isinstance(clock, Clock)
    scheduler.node_down("h3")
    scheduler.submit(job("web", count=6, rebalance=True))
    scheduler.submit(job("api", count=6))  # not opted in: stays as it is
    assert where(scheduler, "web") == where(scheduler, "api") == {"h1": 3, "h2": 3}
    scheduler.node_up(Node("h3", 1000, 1000))  # joins: one move at once
    assert where(scheduler, "web") == {"h1": 3, "h2": 2, "h3": 1}
    moved = [a for a in scheduler.job_allocations("web") if a.desired == "stop"]
    assert [(a.node, a.index, a.history[-1].detail) for a in moved] == [
        ("h2", 5, "stop: rebalancing: h2 holds 3, h3 0")]
    clock.now += 5  # the next move waits for the interval
    assert scheduler.evaluate().empty
    clock.now += 5
    scheduler.evaluate()
    assert where(scheduler, "web") == {"h1": 2, "h2": 2, "h3": 2}
    clock.now += 10
    assert scheduler.evaluate().empty  # balanced: no more moves
    assert scheduler.rebalancing == {}
    assert where(scheduler, "api") == {"h1": 3, "h2": 3}


def test_a_changed_group_replaces_its_allocations(scheduler: Scheduler) -> None:
    scheduler.submit(job("web", count=2))
    before = {a.id for a in scheduler.job_allocations("web")}
    assert scheduler.submit(job("web", count=2)).empty  # the same definition: nothing
    changed = job_from_dict({"name": "web", "strategy": "spread", "groups": [
        {"name": "g", "count": 2, "driver": "exec", "config": {"command": "sleep",
                                                              "args": ["5"]},
         "resources": {"cpu": 100, "memory": 100}},
        {"name": "extra", "count": 1, "driver": "exec", "config": {"command": "true"}}]})
    plan = scheduler.submit(changed)
    assert sorted((a.id, reason) for a, reason in plan.stop) == sorted(
        (i, "job updated: the group's definition changed") for i in before)
    assert sorted((a.group, a.index) for a in plan.place) == [("extra", 0), ("g", 0), ("g", 1)]
    plan = scheduler.submit(job("web", count=2))  # back, without the extra group
    assert {reason for _, reason in plan.stop} == {
        "group extra removed from the job", "job updated: the group's definition changed"}


def test_finished_allocations_and_stopped_jobs_are_collected_after_an_hour(
        scheduler: Scheduler) -> None:
    clock = scheduler.clock
    assert isinstance(clock, Clock)
    scheduler.submit(job("web", count=1))
    scheduler.submit(job("api", count=1))
    [web] = scheduler.job_allocations("web")
    scheduler.report(web.id, "failed", "exit status 1")  # replaced after its delay
    scheduler.stop("api")
    [api] = scheduler.job_allocations("api")
    scheduler.report(api.id, "complete", "stopped by the scheduler")
    clock.now += 3599
    scheduler.evaluate()
    assert web.id in scheduler.allocations and scheduler.job("api").name == "api"
    clock.now += 1
    scheduler.evaluate()
    assert scheduler.collected == {web.id, api.id}
    assert [a.previous for a in scheduler.job_allocations("web")] == [web.id]
    with pytest.raises(UnknownJob):
        scheduler.job("api")
