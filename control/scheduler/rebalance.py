"""Rebalancing, for spread jobs that opt in (``"rebalance": true``): when a node
joins, move allocations one at a time from the node that holds most of a group
onto the room the newcomer made, until the group's allocations per feasible node
differ by at most one.

A move is a stop: reconciliation then places the missing allocation as any other,
so it lands where the strategy says. The scheduler spaces moves of one job by
REBALANCE_INTERVAL, so a join never restarts much of a job at once. Binpack and
random jobs are left alone: an empty node is no reason to move them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from consulate.control.scheduler.alloc import Allocation
from consulate.control.scheduler.cluster import Cluster, holds_resources
from consulate.control.scheduler.nodes import Node
from consulate.control.scheduler.placement import GroupPlacer
from consulate.control.scheduler.spec import Job

REBALANCE_INTERVAL = 10.0  # seconds between two moves of one job


def pick_move(job: Job, allocations: Iterable[Allocation],
              nodes: Iterable[Node]) -> tuple[Allocation, str] | None:
    """One allocation to move, with why; None when the job is balanced."""
    if job.strategy != "spread" or job.type == "system":
        return None
    node_list = list(nodes)
    live = [a for a in allocations if holds_resources(a)]
    cluster = Cluster(node_list, live)
    for group in job.groups:
        mine = [a for a in live if (a.job, a.group) == (job.name, group.name)]
        if not mine:
            continue
        per_node = Counter(a.node for a in mine)
        placer = GroupPlacer(cluster, job, group)
        room = [name for name, code in zip(cluster.names, placer.reason_codes(), strict=True)
                if code == 0]
        if not room:
            continue
        emptiest = min(room, key=lambda name: (per_node[name], name))
        busiest = max(per_node, key=lambda name: (per_node[name], name))
        if per_node[busiest] - per_node[emptiest] >= 2:
            moved = max((a for a in mine if a.node == busiest), key=lambda a: a.index)
            return moved, (f"rebalancing: {busiest} holds {per_node[busiest]}, "
                           f"{emptiest} {per_node[emptiest]}")
    return None
