"""Placement: feasibility first, then ranking by the job's strategy, one allocation
at a time, each decision explained.

Feasibility has two parts. The fixed part (driver, hard attribute constraints,
the attributes distinct_property needs) depends only on the node and is checked
once per group. The changing part (free CPU and memory, a free static port,
distinct_hosts, distinct_property counts, co-location with and conflicts against
other jobs by glob) is checked for every allocation, on arrays of all nodes.

Ranking scores each feasible node per factor, every factor in [0, 1]:

- ``binpack``: Nomad's best fit, ``(20 - (10^free_cpu + 10^free_mem)) / 18`` with
  the free fractions left after the placement: fuller nodes score higher.
- ``spread``: ``1 / (1 + allocations of this job on the node)``, with
  ``node-spread`` (the same over every job's allocations) at a small weight to
  break ties towards the nodes that hold fewest: the allocations per node then
  differ by at most one across the cluster.
- ``random``: a uniform draw.
- ``affinity`` (when the job has soft constraints): the share of their weight
  the node meets.

The final score is the weighted mean; the first node (by name) wins ties, so a
decision is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import numpy.typing as npt

from consulate.control.scheduler.cluster import Cluster, IntArray
from consulate.control.scheduler.constraints import Constraint
from consulate.control.scheduler.explain import STATIC, Explanation, ScoredNode
from consulate.control.scheduler.spec import Group, Job

TOP_NODES = 3
WEIGHTS = {"binpack": 1.0, "spread": 1.0, "random": 1.0, "node-spread": 0.05, "affinity": 1.0}
FloatArray = npt.NDArray[np.floating[Any]]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Placed:
    position: int
    node: str
    ports: dict[str, int]
    explanation: Explanation


@dataclass
class _Distinct:
    """A distinct_property constraint: ``values`` indexes each node's property value."""

    constraint: Constraint
    values: IntArray  # -1 where the node lacks the property (ruled out statically)
    limit: int
    group_scope: bool
    code: int


class GroupPlacer:
    """Places the allocations of one group, one ``place`` call each, against a cluster
    the caller updates (``cluster.add``) after every placement it keeps."""

    def __init__(self, cluster: Cluster, job: Job, group: Group, *,
                 rng: np.random.Generator | None = None) -> None:
        self.cluster, self.job, self.group = cluster, job, group
        self.rng = rng or np.random.default_rng()
        self.reasons: list[str] = ["", "fixed"]
        hard = [c for c in (*job.constraints, *group.constraints)
                if not c.soft and c.operator not in ("distinct_hosts", "distinct_property")]
        soft = [c for c in (*job.constraints, *group.constraints) if c.soft]
        self.distinct = [self._distinct(c, c in group.constraints)
                         for c in (*job.constraints, *group.constraints)
                         if c.operator == "distinct_property"]
        # Nodes fail fixed conditions the same way for every group that has them:
        # worked out once per cluster view (Nomad caches by computed node class).
        key = (group.driver, tuple(hard), tuple(d.constraint.attribute for d in self.distinct))
        if key not in cluster.fixed:
            cluster.fixed[key] = self._fixed(hard)
        self.static_codes, self.static_reasons = cluster.fixed[key]
        self.affinity = None
        if soft:
            total = sum(c.weight for c in soft)
            self.affinity = np.array([sum(c.weight for c in soft if c.matches(node)) / total
                                      for node in cluster.nodes])
        self.distinct_hosts = [c for c in (*job.constraints, *group.constraints)
                               if c.operator == "distinct_hosts" and c.value == "true"]
        self.distinct_hosts_group = any(c in group.constraints for c in self.distinct_hosts)
        self.code_cpu = self._code(f"cpu exhausted: needs {group.cpu} MHz free")
        self.code_memory = self._code(f"memory exhausted: needs {group.memory} MB free")
        self.code_distinct_hosts = self._code(
            f"distinct_hosts: the node already runs an allocation of "
            f"{'group ' + group.name if self.distinct_hosts_group else 'job ' + job.name}")
        self.static_ports = [(p.static, self._code(f"port {p.static} is already in use"))
                             for p in group.ports if p.static is not None]
        self.port_free = [np.array([port not in used for used in cluster.ports_used])
                          for port, _ in self.static_ports]
        self.not_colocated = self._colocation()
        self.code_colocate = self._code("colocate_with " + ", ".join(job.colocate_with) +
                                        ": no allocation of a matching job on the node")
        self.conflicting = self._conflicts()
        self.code_conflict = self._code("conflicts_with " + ", ".join(job.conflicts_with) +
                                        ": the node runs an allocation of a matching job")

    def _code(self, reason: str) -> int:
        self.reasons.append(reason)
        return len(self.reasons) - 1

    def _fixed(self, hard: list[Constraint]) -> tuple[npt.NDArray[np.uint8], dict[int, str]]:
        codes = np.zeros(len(self.cluster), dtype=np.uint8)
        reasons: dict[int, str] = {}
        for i, node in enumerate(self.cluster.nodes):
            reason = self._static_reason(node.drivers, hard, i)
            if reason:
                reasons[i] = reason
                codes[i] = STATIC
        return codes, reasons

    def _static_reason(self, drivers: Sequence[str], hard: list[Constraint], i: int) -> str:
        if self.group.driver not in drivers:
            return (f"driver {self.group.driver} is not available on the node "
                    f"(it has {', '.join(drivers) or 'none'})")
        node = self.cluster.nodes[i]
        for constraint in hard:
            if not constraint.matches(node):
                return constraint.miss_reason(node)
        for distinct in self.distinct:
            if distinct.values[i] < 0:
                return f"distinct_property {distinct.constraint.attribute}: not set on the node"
        return ""

    def _distinct(self, constraint: Constraint, group_scope: bool) -> _Distinct:
        found = [constraint.resolve(node) for node in self.cluster.nodes]
        index = {value: i for i, value in enumerate(sorted({v for v in found if v is not None}))}
        values = np.array([-1 if v is None else index[v] for v in found], dtype=np.int64)
        limit = int(constraint.value)
        whose = f"group {self.group.name}" if group_scope else f"job {self.job.name}"
        code = self._code(f"distinct_property {constraint.attribute}: its value on this node "
                          f"already holds {limit} allocation(s) of {whose}")
        return _Distinct(constraint, values, limit, group_scope, code)

    def _matching_jobs(self, globs: Sequence[str]) -> BoolArray:
        present = np.zeros(len(self.cluster), dtype=bool)
        for other in self.cluster.jobs():
            if other != self.job.name and any(fnmatchcase(other, g) for g in globs):
                present |= self.cluster.job_counts(other) > 0
        return present

    def _colocation(self) -> BoolArray | None:
        if not self.job.colocate_with:
            return None
        return ~self._matching_jobs(self.job.colocate_with)

    def _conflicts(self) -> BoolArray | None:
        if not self.job.conflicts_with:
            return None
        return self._matching_jobs(self.job.conflicts_with)

    def _own_counts(self, group_scope: bool) -> IntArray:
        if group_scope:
            return self.cluster.group_counts(self.job.name, self.group.name)
        return self.cluster.job_counts(self.job.name)

    def reason_codes(self) -> npt.NDArray[np.uint8]:
        """Per node: 0 when it can take one more allocation now, else the first reason."""
        cluster, group = self.cluster, self.group
        codes = self.static_codes.copy()

        def rule_out(bad: BoolArray, code: int) -> None:
            codes[(codes == 0) & bad] = code

        rule_out(cluster.cpu_total - cluster.cpu_used < group.cpu, self.code_cpu)
        rule_out(cluster.memory_total - cluster.memory_used < group.memory, self.code_memory)
        for (_, code), free in zip(self.static_ports, self.port_free, strict=True):
            rule_out(~free, code)
        if self.distinct_hosts:
            rule_out(self._own_counts(self.distinct_hosts_group) > 0, self.code_distinct_hosts)
        for distinct in self.distinct:
            known = distinct.values >= 0
            held = np.bincount(distinct.values[known],
                               weights=self._own_counts(distinct.group_scope)[known],
                               minlength=int(distinct.values.max(initial=0)) + 1)
            full = np.zeros(len(cluster), dtype=bool)
            full[known] = held[distinct.values[known]] >= distinct.limit
            rule_out(full, distinct.code)
        if self.not_colocated is not None:
            rule_out(self.not_colocated, self.code_colocate)
        if self.conflicting is not None:
            rule_out(self.conflicting, self.code_conflict)
        return codes

    def scores(self, candidates: IntArray) -> dict[str, FloatArray]:
        """Each factor's score for the nodes at ``candidates``."""
        cluster, group = self.cluster, self.group
        cpu_total = np.maximum(cluster.cpu_total[candidates], 1)
        memory_total = np.maximum(cluster.memory_total[candidates], 1)
        cpu_after = (cluster.cpu_used[candidates] + group.cpu) / cpu_total
        memory_after = (cluster.memory_used[candidates] + group.memory) / memory_total
        factors: dict[str, FloatArray] = {}
        strategy = self.job.strategy
        if strategy == "binpack":
            factors["binpack"] = (20.0 - (10.0 ** (1.0 - cpu_after) +
                                          10.0 ** (1.0 - memory_after))) / 18.0
        elif strategy == "spread":
            factors["spread"] = 1.0 / (1.0 + self._own_counts(False)[candidates])
            factors["node-spread"] = 1.0 / (1.0 + cluster.alloc_count[candidates])
        else:
            factors["random"] = self.rng.random(len(candidates))
        if self.affinity is not None:
            factors["affinity"] = self.affinity[candidates]
        return factors

    def place(self, only: int | None = None) -> Placed | Explanation:
        """The best node for one more allocation (or, with ``only``, that node if it is
        feasible: system jobs); the explanation of the failure when none can take it."""
        codes = self.reason_codes()
        if only is not None:
            feasible_mask = np.zeros(len(codes), dtype=bool)
            feasible_mask[only] = codes[only] == 0
        else:
            feasible_mask = codes == 0
        candidates = np.flatnonzero(feasible_mask)
        if len(candidates) == 0:
            return self._explain(None, codes, candidates, np.zeros(0), {})
        factors = self.scores(candidates)
        total_weight = sum(WEIGHTS[f] for f in factors)
        final = sum(WEIGHTS[f] * s for f, s in factors.items()) / total_weight
        best = int(candidates[int(np.argmax(final))])
        explanation = self._explain(best, codes, candidates, final, factors)
        ports = self._ports(best)
        return Placed(best, self.cluster.names[best], ports, explanation)

    def _ports(self, position: int) -> dict[str, int]:
        ports: dict[str, int] = {}
        for port in self.group.ports:
            if port.static is not None:
                ports[port.label] = port.static
        for (_, _), free in zip(self.static_ports, self.port_free, strict=True):
            free[position] = False
        for port in self.group.ports:
            if port.static is None:
                dynamic = self.cluster.free_dynamic_port(position, set(ports.values()))
                if dynamic is None:  # 12,001 ports in use: not a real-world case
                    raise RuntimeError(f"node {self.cluster.names[position]}: no free port")
                ports[port.label] = dynamic
        return ports

    def _explain(self, chosen: int | None, codes: npt.NDArray[np.uint8], candidates: IntArray,
                 final: FloatArray | float, factors: dict[str, FloatArray]) -> Explanation:
        top: list[ScoredNode] = []
        if len(candidates):
            final_array = np.asarray(final, dtype=np.float64)
            best = np.argsort(-final_array, kind="stable")[:TOP_NODES]  # ties: by name
            columns = {f: s[best].tolist() for f, s in factors.items()}
            finals = final_array[best].tolist()
            top = [ScoredNode(self.cluster.names[position],
                              {f: column[row] for f, column in columns.items()}, finals[row])
                   for row, position in enumerate(candidates[best].tolist())]
        return Explanation(self.job.name, self.group.name, self.job.strategy,
                           None if chosen is None else self.cluster.names[chosen], tuple(top),
                           len(codes), len(candidates), self.cluster.names, codes,
                           self.static_reasons, self.reasons)
