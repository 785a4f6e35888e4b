"""Why a placement went where it went: the best nodes with their per-factor scores,
and for every other node the reason it could not take the allocation.

Nomad keeps the same facts in an allocation's metrics (nodes evaluated, filtered
by constraint, exhausted by dimension, score metadata); here they are kept
compactly (one reason code per node) and spelled out on request.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

STATIC = 1  # reason code: the node fails a fixed condition (see static_reasons)


@dataclass(frozen=True)
class ScoredNode:
    node: str
    scores: Mapping[str, float]  # factor -> score in [0, 1]
    final: float

    def to_json(self) -> dict[str, object]:
        return {"node": self.node, "scores": {k: round(v, 4) for k, v in self.scores.items()},
                "final": round(self.final, 4)}


@dataclass(frozen=True)
class Explanation:
    """One placement decision. ``chosen`` is None when no node could take it."""

    job: str
    group: str
    strategy: str
    chosen: str | None
    top: tuple[ScoredNode, ...]
    evaluated: int
    feasible: int
    names: Sequence[str]  # the cluster's node order (shared between decisions)
    codes: npt.NDArray[np.uint8]  # per node: 0 feasible, STATIC, or an index of reasons
    static_reasons: Mapping[int, str]  # node position -> reason (shared)
    reasons: Sequence[str]  # reason code -> text, for codes above STATIC (shared)

    def reason(self, position: int) -> str | None:
        code = int(self.codes[position])
        if code == 0:
            return None
        return self.static_reasons[position] if code == STATIC else self.reasons[code]

    def infeasible(self) -> dict[str, str]:
        """Every node that could not take the allocation, with why."""
        return {self.names[i]: self.reason(i) or ""
                for i in np.flatnonzero(self.codes).tolist()}

    def filtered(self) -> dict[str, int]:
        """How many nodes each reason ruled out (the summary Nomad prints)."""
        counts = Counter(self.infeasible().values())
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def to_json(self, *, nodes: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "job": self.job, "group": self.group, "strategy": self.strategy,
            "chosen": self.chosen, "nodes_evaluated": self.evaluated,
            "nodes_feasible": self.feasible, "top": [t.to_json() for t in self.top],
            "filtered": self.filtered()}
        if nodes:
            data["infeasible"] = self.infeasible()
        return data


def render(data: Mapping[str, Any]) -> str:
    """An explanation (as ``to_json`` gives it) as the text ``consulate alloc explain``
    prints."""
    lines = [f"Job         = {data['job']}", f"Group       = {data['group']}",
             f"Strategy    = {data['strategy']}",
             f"Placed on   = {data['chosen'] or '(not placed)'}",
             f"Nodes       = {data['nodes_evaluated']} evaluated, "
             f"{data['nodes_feasible']} feasible"]
    top = data["top"]
    if top:
        factors = sorted({f for t in top for f in t["scores"]})
        rows = [["Node", *factors, "final score"]]
        rows += [[t["node"], *(f"{t['scores'].get(f, 0.0):.3f}" for f in factors),
                  f"{t['final']:.3f}"] for t in top]
        lines += ["", "Top nodes", *text_table(rows)]
    infeasible = data.get("infeasible", {})
    if infeasible:
        lines += ["", "Infeasible nodes", *text_table([["Node", "Reason"],
                                                   *map(list, sorted(infeasible.items()))])]
    return "\n".join(lines)


def text_table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]
