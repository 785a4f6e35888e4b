"""Manifold at scale, with simulated nodes in this process (no containers).

Three measurements, each repeated with a different seed (min/median/max):

- rate: placements per second for 10,000 allocations (50 jobs of 200, half binpack
  half spread, each with hard constraints on kernel, rack and kernel version) on
  1,000 nodes, pinned to one core; against a peer in the same run, the same
  decisions made by a plain Python loop over the nodes (static feasibility
  computed once per group there too, so the ratio is the vectorised ranking alone).
- packing: nodes used by the binpack strategy, placing jobs of mixed sizes in
  arrival order, against the offline first-fit-decreasing bound on the same
  allocations (FFD sorts by size first, which an online scheduler cannot).
- skew: max - min allocations per node after 10,000 spread allocations, against
  the random strategy.

    python -m bench.scheduler [--reps 3] [--nodes 1000] [--allocations 10000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench import report
from bench.report import Cell, Metric, Section
from bench.signals import run_main
from consulate.control.scheduler.constraints import Constraint
from consulate.control.scheduler.nodes import Node
from consulate.control.scheduler.reconcile import reconcile
from consulate.control.scheduler.spec import Group, Job, job_from_dict

RESULTS = Path(__file__).parent / "results"
NODE_CPU, NODE_MEMORY = 8000, 16384

SECTIONS = [
    Section("rate", "Placements per second (1 core)",
            (Metric("rate", "placements", "1/s", True, 0),), "scheduler-rate.png",
            extras=(Metric("seconds", "wall time", "s", False, 2),
                    Metric("placed", "placed", "allocations", True, 0),
                    Metric("same", "same node as consulate", "%", True, 1)),
            versus=("python-loop",)),
    Section("packing", "Binpack: nodes used vs the offline FFD bound",
            (Metric("nodes", "nodes used", "nodes", False, 0),), "scheduler-packing.png",
            extras=(Metric("gap", "gap over FFD", "%", False, 2),), versus=("ffd-offline",)),
    Section("skew", "Spread: skew (max - min allocations per node)",
            (Metric("skew", "skew", "allocations", False, 0),), "scheduler-skew.png",
            extras=(Metric("max", "max per node", "allocations", False, 0),),
            versus=("random",)),
]


def make_nodes(count: int, rng: np.random.Generator) -> list[Node]:
    kernels = ["6.1.0-13-amd64", "5.10.0-26-amd64", "6.5.0-1-amd64"]
    return [Node(f"node-{i:05d}", NODE_CPU, NODE_MEMORY,
                 attributes={"kernel.name": "linux" if i % 50 else "freebsd",
                             "kernel.version": kernels[int(rng.integers(3))],
                             "cpu.arch": "x86_64"},
                 meta={"rack": f"r{i % 40:02d}", "zone": "abc"[i % 3]})
            for i in range(count)]


def make_jobs(count: int, per_job: int, rng: np.random.Generator,
              strategies: Sequence[str]) -> dict[str, Job]:
    constraints = [{"attribute": "${attr.kernel.name}", "operator": "=", "value": "linux"},
                   {"attribute": "${meta.rack}", "operator": "regexp", "value": "^r[0-2]"},
                   {"attribute": "${attr.kernel.version}", "operator": "version",
                    "value": ">= 5.4"}]
    jobs = {}
    for k in range(count):
        cpu = int(rng.choice([100, 200, 250, 500, 1000]))
        memory = int(rng.choice([64, 128, 256, 512, 1024]))
        jobs[f"job-{k:03d}"] = job_from_dict({
            "name": f"job-{k:03d}", "strategy": strategies[k % len(strategies)],
            "constraints": constraints,
            "groups": [{"name": "g", "count": per_job, "driver": "exec",
                        "config": {"command": "sleep"},
                        "resources": {"cpu": cpu, "memory": memory}}]})
    return jobs


def place_vectorised(jobs: dict[str, Job], nodes: list[Node],
                     seed: int) -> tuple[list[str], float]:
    """The node of each placement, in order, and the seconds they took."""
    started = time.perf_counter()
    plan = reconcile(jobs, [], nodes, rng=np.random.default_rng(seed))
    return [a.node for a in plan.place], time.perf_counter() - started


def place_python_loop(jobs: dict[str, Job], nodes: list[Node]) -> tuple[list[str], float]:
    """The peer: the same feasibility and scores, one node at a time in Python."""
    started = time.perf_counter()
    cpu_used = [0] * len(nodes)
    memory_used = [0] * len(nodes)
    allocations = [0] * len(nodes)
    job_count: dict[str, list[int]] = {}
    placed: list[str] = []
    for name in sorted(jobs):
        job = jobs[name]
        for group in job.groups:
            feasible = [i for i, node in enumerate(nodes) if _static_ok(job, group, node)]
            counts = job_count.setdefault(name, [0] * len(nodes))
            for _ in range(group.count):
                best, best_score = -1, -1.0
                for i in feasible:
                    node = nodes[i]
                    if node.cpu - cpu_used[i] < group.cpu or \
                            node.memory - memory_used[i] < group.memory:
                        continue
                    cpu_after = (cpu_used[i] + group.cpu) / node.cpu
                    memory_after = (memory_used[i] + group.memory) / node.memory
                    if job.strategy == "binpack":
                        score = (20 - (10 ** (1 - cpu_after) + 10 ** (1 - memory_after))) / 18
                    else:
                        score = (1 / (1 + counts[i]) + 0.05 / (1 + allocations[i])) / 1.05
                    if score > best_score:
                        best, best_score = i, score
                if best < 0:
                    break
                cpu_used[best] += group.cpu
                memory_used[best] += group.memory
                counts[best] += 1
                allocations[best] += 1
                placed.append(nodes[best].name)
    return placed, time.perf_counter() - started


def _static_ok(job: Job, group: Group, node: Node) -> bool:
    hard: list[Constraint] = [c for c in (*job.constraints, *group.constraints) if not c.soft]
    return group.driver in node.drivers and all(c.matches(node) for c in hard)


def ffd_bins(sizes: list[tuple[int, int]]) -> int:
    """Offline first-fit decreasing for two dimensions (largest share of a node first)."""
    order = sorted(sizes, key=lambda s: max(s[0] / NODE_CPU, s[1] / NODE_MEMORY),
                   reverse=True)
    bins: list[list[int]] = []
    for cpu, memory in order:
        for free in bins:
            if free[0] >= cpu and free[1] >= memory:
                free[0] -= cpu
                free[1] -= memory
                break
        else:
            bins.append([NODE_CPU - cpu, NODE_MEMORY - memory])
    return len(bins)


def measure(args: argparse.Namespace, rep: int, results: report.Results) -> None:
    rng = np.random.default_rng(rep)
    nodes = make_nodes(args.nodes, rng)
    jobs_count = 50
    per_job = args.allocations // jobs_count
    mixed = make_jobs(jobs_count, per_job, rng, ("binpack", "spread"))
    ours, seconds = place_vectorised(mixed, nodes, rep)
    results["rate"]["consulate"].samples.append(
        {"rate": len(ours) / seconds, "seconds": seconds, "placed": len(ours), "same": 100.0})
    theirs, seconds = place_python_loop(mixed, nodes)
    same = sum(a == b for a, b in zip(ours, theirs, strict=False)) / max(len(ours), 1)
    results["rate"]["python-loop"].samples.append(
        {"rate": len(theirs) / seconds, "seconds": seconds, "placed": len(theirs),
         "same": 100 * same})
    rates = [results["rate"][v].samples[-1]["rate"] for v in ("consulate", "python-loop")]
    print(f"rep={rep} rate: consulate={rates[0]:.0f}/s python-loop={rates[1]:.0f}/s "
          f"placed={len(ours)}/{len(theirs)} same-node={100 * same:.1f}%", file=sys.stderr)

    unconstrained = [Node(n.name, n.cpu, n.memory) for n in nodes]
    binpack = make_jobs(jobs_count, per_job, rng, ("binpack",))
    plan = reconcile({n: replace(j, constraints=()) for n, j in binpack.items()}, [],
                     unconstrained)
    used = len({a.node for a in plan.place})
    bound = ffd_bins([(a.cpu, a.memory) for a in plan.place])
    results["packing"]["consulate-binpack"].samples.append(
        {"nodes": used, "gap": 100 * (used - bound) / bound})
    results["packing"]["ffd-offline"].samples.append({"nodes": bound, "gap": 0.0})
    print(f"rep={rep} packing: binpack={used} ffd={bound} unplaced={sum(plan.unplaced.values())}",
          file=sys.stderr)

    for strategy, variant in (("spread", "consulate-spread"), ("random", "random")):
        jobs = make_jobs(jobs_count, per_job, rng, (strategy,))
        jobs = {n: replace(j, constraints=()) for n, j in jobs.items()}
        plan = reconcile(jobs, [], unconstrained, rng=np.random.default_rng(rep))
        per_node = Counter(a.node for a in plan.place)
        counts = [per_node.get(n.name, 0) for n in unconstrained]
        results["skew"][variant].samples.append({"skew": max(counts) - min(counts),
                                                 "max": max(counts)})
    print(f"rep={rep} skew: spread={results['skew']['consulate-spread'].samples[-1]['skew']} "
          f"random={results['skew']['random'].samples[-1]['skew']}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--allocations", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="100 nodes, 1,000 allocations, "
                        "one repetition: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.nodes, args.allocations = 1, 100, 1000
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})  # one core, as the target is stated
    variants = {"rate": ["consulate", "python-loop"],
                "packing": ["consulate-binpack", "ffd-offline"],
                "skew": ["consulate-spread", "random"]}
    results: report.Results = {s.key: {v: Cell() for v in variants[s.key]} for s in SECTIONS}
    started = time.time()
    for rep in range(args.reps):
        measure(args, rep, results)
    args.out.mkdir(parents=True, exist_ok=True)
    preamble = [
        ("Conditions", [("machine", f"{platform.node()} {platform.machine()}, "
                                    f"{os.cpu_count()} cores, pinned to core {cpu}"),
                        ("python", platform.python_version()),
                        ("numpy", np.__version__),
                        ("nodes", f"{args.nodes:,} ({NODE_CPU} MHz, {NODE_MEMORY} MB each)"),
                        ("allocations", f"{args.allocations:,} in 50 jobs"),
                        ("repetitions", f"{args.reps} (seeds 0..{args.reps - 1})"),
                        ("elapsed", f"{time.time() - started:.0f} s"),
                        ("command", "python -m bench.scheduler "
                         + " ".join(argv or sys.argv[1:]))]),
        ("Targets (issue 10)", [("rate", ">= 1,000 placements/s at 1,000 nodes"),
                                ("packing", "binpack gap over FFD <= 5%"),
                                ("skew", "spread skew <= 1")]),
    ]
    text = ""
    for section in SECTIONS:
        names = variants[section.key]
        text += f"\n## {section.title}\n\n" + report.table(section, results[section.key],
                                                           names, args.reps)
        text += f"\n![{section.title}]({section.chart})\n"
        report.chart(section, results[section.key], names, args.out / section.chart)
    head = report.markdown("Scheduler benchmark: Manifold placement at scale", preamble, [],
                           results, [], args.reps)
    (args.out / "scheduler.md").write_text(head + text)
    (args.out / "scheduler.json").write_text(json.dumps(report.results_json(results),
                                                        indent=1) + "\n")
    print((args.out / "scheduler.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
