"""Placement: feasibility per dimension, each strategy, soft constraints, explanations."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from consulate.control.scheduler.explain import render
from consulate.control.scheduler.nodes import Node
from consulate.control.scheduler.reconcile import reconcile
from consulate.control.scheduler.spec import Job, job_from_dict


def job(name: str = "web", count: int = 1, strategy: str = "binpack", cpu: int = 100,
        memory: int = 100, **extra: Any) -> Job:
    group = {"name": "g", "count": count, "driver": "exec", "config": {"command": "sleep"},
             "resources": {"cpu": cpu, "memory": memory}}
    group.update(extra.pop("group", {}))
    return job_from_dict({"name": name, "strategy": strategy, "groups": [group], **extra})


def nodes(*specs: tuple[str, int, int], **meta: dict[str, str]) -> list[Node]:
    return [Node(name, cpu, memory, meta=meta.get(name, {}),
                 attributes={"kernel.name": "linux"}) for name, cpu, memory in specs]


def placed(jobs: list[Job], cluster: list[Node], seed: int = 1) -> Counter[str]:
    plan = reconcile({j.name: j for j in jobs}, [], cluster, rng=np.random.default_rng(seed))
    return Counter(a.node for a in plan.place)


def test_spread_lands_two_one_one_on_three_hosts() -> None:
    cluster = nodes(("h1", 1000, 1000), ("h2", 1000, 1000), ("h3", 1000, 1000))
    assert placed([job(count=4, strategy="spread")], cluster) == {"h1": 2, "h2": 1, "h3": 1}


def test_spread_keeps_skew_at_most_one_across_jobs() -> None:
    cluster = nodes(*((f"n{i}", 10000, 10000) for i in range(7)))
    jobs = [job(f"j{k}", count=5, strategy="spread") for k in range(6)]
    plan = reconcile({j.name: j for j in jobs}, [], cluster)
    per_node = Counter(a.node for a in plan.place)
    assert sum(per_node.values()) == 30
    assert max(per_node.values()) - min(per_node.values()) <= 1
    for j in jobs:  # and each job on 5 distinct nodes
        assert len({a.node for a in plan.place if a.job == j.name}) == 5


def test_binpack_fills_the_fullest_node_that_fits_first() -> None:
    cluster = nodes(("big", 1000, 1000), ("small", 300, 300))
    # best fit: the small node is fuller after each placement, until it is full
    plan = reconcile({"web": job(count=5, cpu=100, memory=100)}, [], cluster)
    assert [a.node for a in plan.place] == ["small", "small", "small", "big", "big"]


def test_random_spreads_over_feasible_nodes_only() -> None:
    cluster = nodes(*((f"n{i}", 1000, 1000) for i in range(4)), ("tiny", 50, 50))
    counts = placed([job(count=12, strategy="random")], cluster, seed=7)
    assert set(counts) == {"n0", "n1", "n2", "n3"}
    assert counts != placed([job(count=12, strategy="random")], cluster, seed=8)
    assert counts == placed([job(count=12, strategy="random")], cluster, seed=7)


def test_cpu_memory_and_driver_exhaustion_are_explained() -> None:
    cluster = nodes(("a", 100, 1000), ("b", 1000, 100), ("c", 700, 1000))
    cluster.append(Node("d", 1000, 1000, drivers=("docker",)))
    plan = reconcile({"web": job(count=2, cpu=500, memory=500)}, [], cluster)
    assert [a.node for a in plan.place] == ["c"]
    explanation = plan.pending[("web", "g")]
    assert explanation.chosen is None
    assert explanation.infeasible() == {
        "a": "cpu exhausted: needs 500 MHz free",
        "b": "memory exhausted: needs 500 MB free",
        "c": "cpu exhausted: needs 500 MHz free",
        "d": "driver exec is not available on the node (it has docker)"}
    assert plan.unplaced == {("web", "g"): 1}


def test_static_port_must_be_free() -> None:
    cluster = nodes(("a", 10000, 10000), ("b", 10000, 10000))
    cluster[1] = Node("b", 10000, 10000, reserved_ports=frozenset({8080}))
    web = job(count=2, group={"ports": [{"label": "http", "static": 8080},
                                        {"label": "x"}]})
    plan = reconcile({"web": web}, [], cluster)
    assert [(a.node, a.ports) for a in plan.place] == [("a", {"http": 8080, "x": 20000})]
    assert plan.pending[("web", "g")].infeasible() == {"a": "port 8080 is already in use",
                                                       "b": "port 8080 is already in use"}


def test_distinct_hosts() -> None:
    cluster = nodes(("a", 10000, 10000), ("b", 10000, 10000))
    plan = reconcile({"web": job(count=3, constraints=[{"operator": "distinct_hosts"}])},
                     [], cluster)
    assert sorted(a.node for a in plan.place) == ["a", "b"]
    assert plan.pending[("web", "g")].filtered() == {
        "distinct_hosts: the node already runs an allocation of job web": 2}


def test_distinct_property_limits_allocations_per_value() -> None:
    cluster = nodes(("a", 10000, 10000), ("b", 10000, 10000), ("c", 10000, 10000),
                    ("d", 10000, 10000),
                    a={"rack": "r1"}, b={"rack": "r1"}, c={"rack": "r2"})
    rack = {"attribute": "${meta.rack}", "operator": "distinct_property", "value": "2"}
    plan = reconcile({"web": job(count=5, strategy="spread", constraints=[rack])}, [],
                     cluster)
    by_rack = Counter({"a": "r1", "b": "r1", "c": "r2"}[a.node] for a in plan.place)
    assert by_rack == {"r1": 2, "r2": 2}
    assert plan.pending[("web", "g")].infeasible() == {
        "a": "distinct_property ${meta.rack}: its value on this node already holds 2 "
             "allocation(s) of job web",
        "b": "distinct_property ${meta.rack}: its value on this node already holds 2 "
             "allocation(s) of job web",
        "c": "distinct_property ${meta.rack}: its value on this node already holds 2 "
             "allocation(s) of job web",
        "d": "distinct_property ${meta.rack}: not set on the node"}


def test_colocate_with_and_conflicts_with_by_glob() -> None:
    cluster = nodes(("a", 10000, 10000), ("b", 10000, 10000), ("c", 10000, 10000))
    db = reconcile({"db-main": job("db-main", constraints=[
        {"attribute": "${node.unique.name}", "value": "b"}])}, [], cluster)
    allocations = db.place
    near = job("app", count=2, colocate_with=["db-*"])
    away = job("cache", count=2, strategy="spread", conflicts_with=["db-*", "other"])
    plan = reconcile({"db-main": db_job(), "app": near, "cache": away}, allocations, cluster)
    assert sorted((a.job, a.node) for a in plan.place) == [
        ("app", "b"), ("app", "b"), ("cache", "a"), ("cache", "c")]


def db_job() -> Job:
    return job("db-main", constraints=[{"attribute": "${node.unique.name}", "value": "b"}])


def test_system_job_lands_on_every_feasible_node() -> None:
    cluster = nodes(("a", 1000, 1000), ("b", 1000, 1000), ("c", 1000, 1000),
                    b={"role": "edge"})
    logs = job("logs", type="system", count=1,
               constraints=[{"attribute": "${meta.role}", "operator": "!=", "value": "edge"}])
    plan = reconcile({"logs": logs}, [], cluster)
    assert sorted(a.node for a in plan.place) == ["a", "c"]
    again = reconcile({"logs": logs}, plan.place, cluster)
    assert again.empty


def test_soft_constraints_weigh_in_the_score() -> None:
    cluster = nodes(("a", 1000, 1000), ("b", 1000, 1000), ("c", 1000, 1000),
                    c={"ssd": "yes"})
    ssd = {"attribute": "${meta.ssd}", "operator": "~=", "value": "yes", "weight": 100}
    plan = reconcile({"web": job(count=1, strategy="spread", constraints=[ssd])}, [], cluster)
    [allocation] = plan.place
    assert allocation.node == "c"
    assert allocation.explanation is not None
    assert [(t.node, dict(t.scores)) for t in allocation.explanation.top] == [
        ("c", {"spread": 1.0, "node-spread": 1.0, "affinity": 1.0}),
        ("a", {"spread": 1.0, "node-spread": 1.0, "affinity": 0.0}),
        ("b", {"spread": 1.0, "node-spread": 1.0, "affinity": 0.0})]
    # soft: a node that misses it is still used when it is the only one left
    only_a = nodes(("a", 1000, 1000))
    assert placed([job(count=1, constraints=[ssd])], only_a) == {"a": 1}


def test_explanation_json_and_text() -> None:
    cluster = nodes(("a", 1000, 1000), ("b", 1000, 1000), ("c", 400, 1000),
                    ("d", 1000, 1000), d={"rack": "r9"})
    linux = {"attribute": "${meta.rack}", "operator": "!=", "value": "r9"}
    plan = reconcile({"web": job(count=1, cpu=500, constraints=[linux])}, [], cluster)
    [allocation] = plan.place
    assert allocation.explanation is not None
    data = allocation.explanation.to_json()
    assert data == {
        "job": "web", "group": "g", "strategy": "binpack", "chosen": "a",
        "nodes_evaluated": 4, "nodes_feasible": 2,
        "top": [{"node": "a", "scores": {"binpack": 0.4941}, "final": 0.4941},
                {"node": "b", "scores": {"binpack": 0.4941}, "final": 0.4941}],
        "filtered": {"constraint ${meta.rack} != r9 not met: the node has 'r9'": 1,
                     "cpu exhausted: needs 500 MHz free": 1},
        "infeasible": {"c": "cpu exhausted: needs 500 MHz free",
                       "d": "constraint ${meta.rack} != r9 not met: the node has 'r9'"}}
    assert render(data) == """\
Job         = web
Group       = g
Strategy    = binpack
Placed on   = a
Nodes       = 4 evaluated, 2 feasible

Top nodes
Node  binpack  final score
a     0.494    0.494
b     0.494    0.494

Infeasible nodes
Node  Reason
c     cpu exhausted: needs 500 MHz free
d     constraint ${meta.rack} != r9 not met: the node has 'r9'"""
