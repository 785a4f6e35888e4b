"""Issue 3's targets, checked against the medians of one TCP benchmark run.

Each target is a ratio between variants measured in the same run, so the verdict
does not depend on how busy the shared machine was. A missed target comes with
what bounds it, as measured while building the engine (profiles and CPU shares):
the report says why, it does not lower the target.
"""

from __future__ import annotations

from bench.report import Cell, Results

Row = tuple[str, str]

# Why a target can be missed, as measured (see tcp.md's notes); keyed by target.
BOUNDS = {
    "bulk-haproxy": (
        "1.3x the best HAProxy is more than the direct path gives in the same run: "
        "a proxied stream crosses two TCP connections (four socket traversals on "
        "veth/bridge pairs, two congestion windows) where the direct one crosses one, "
        "so no proxy can pass it here. The engine is not what limits it: it spends "
        "30-45 % of a core at full speed (splice through 1 MiB pipes, EPOLLOUT only "
        "while blocked), the rest of the time waiting for the kernel's TCP to move data."
    ),
    "bulk-direct": (
        "The proxy is pinned to CPU 0 (the load generator to CPU 1) and its engine is "
        "one thread: every proxied byte's TCP work for both connections funnels "
        "through that core, which it also shares with the servers' softirq work, "
        "while the direct path's streams spread over both cores. One stream is "
        "latency-bound either way (0.85x direct); eight streams show the single core."
    ),
    "bulk-cpu": (
        "One stream keeps the engine's thread waking for every window the kernel "
        "opens: its CPU is mostly the splice(2) calls' own kernel work (page moves "
        "and TCP send/receive processing done in the caller's context), which "
        "HAProxy's splice path pays too; with 8 streams the wakeups batch and the "
        "engine's share halves."
    ),
    "connrate": (
        "The engine's one thread accepts, reads the original destination, connects "
        "and relays every connection (about 20 syscalls each, conntrack and NAT on "
        "both connections); HAProxy's listener path has no REDIRECT to undo."
    ),
    "python": (
        "Each connection of the Python relay costs one task (connect with a timeout, "
        "then the upstream's transport), a route lookup and counters; the minimal "
        "proxy has the task and the transport only."
    ),
    "latency": (
        "Both proxies add one loopback hop each way; the difference is within the "
        "run-to-run spread of unpinned latency on this VM."
    ),
}


def _median(results: Results, test: str, variant: str, key: str) -> float | None:
    cell: Cell | None = results.get(test, {}).get(variant)
    return cell.median(key) if cell is not None else None


def _best_haproxy(results: Results, test: str, key: str, higher: bool) -> tuple[str, float] | None:
    found = [(name, m) for name, cell in results.get(test, {}).items()
             if name.startswith("haproxy") and (m := cell.median(key)) is not None]
    if not found:
        return None
    return (max if higher else min)(found, key=lambda item: item[1])


def _row(label: str, value: float | None, goal: float, at_least: bool, detail: str,
         bound: str, notes: list[str]) -> Row:
    if value is None:
        return label, "not measured in this run"
    met = value >= goal if at_least else value <= goal
    if not met and bound not in notes:
        notes.append(bound)
    return label, f"{value:.2f}x ({detail}): {'met' if met else '**missed**'}"


def targets(results: Results) -> tuple[list[Row], list[str]]:
    """The target table and, for the missed ones, what bounds them."""
    rows: list[Row] = []
    notes: list[str] = []

    def ratio(test: str, a: str, b: str, key: str) -> tuple[float | None, str]:
        x, y = _median(results, test, a, key), _median(results, test, b, key)
        if x is None or not y:
            return None, ""
        return x / y, f"{x:,.1f} vs {y:,.1f}"

    for test, streams in (("bulk-1", "1 stream"), ("bulk-8", "8 streams")):
        best = _best_haproxy(results, test, "gbps", True)
        native = _median(results, test, "consulate-native", "gbps")
        if best is not None and native is not None:
            rows.append(_row(f"bulk {streams}: native >= 1.3x best HAProxy ({best[0]})",
                             native / best[1], 1.3, True, f"{native:.1f} vs {best[1]:.1f} "
                             "Gbit/s", BOUNDS["bulk-haproxy"], notes))
        value, detail = ratio(test, "consulate-native", "direct", "gbps")
        rows.append(_row(f"bulk {streams}: native >= 0.8x direct", value, 0.8, True,
                         detail + " Gbit/s", BOUNDS["bulk-direct"], notes))
        native_cpu = _median(results, test, "consulate-native", "cpu_per_gbps")
        if best is not None:
            haproxy_cpu = _median(results, test, best[0], "cpu_per_gbps")
            if native_cpu is not None and haproxy_cpu:
                rows.append(_row(f"bulk {streams}: CPU per Gbit/s <= 0.5x {best[0]}'s",
                                 native_cpu / haproxy_cpu, 0.5, False,
                                 f"{native_cpu:.1f} vs {haproxy_cpu:.1f} % of a core",
                                 BOUNDS["bulk-cpu"], notes))
    best_conn = _best_haproxy(results, "connrate", "rps", True)
    native_conn = _median(results, "connrate", "consulate-native", "rps")
    if best_conn is not None and native_conn is not None:
        rows.append(_row(f"connections: native >= 0.8x best HAProxy ({best_conn[0]})",
                         native_conn / best_conn[1], 0.8, True,
                         f"{native_conn:,.0f} vs {best_conn[1]:,.0f} conn/s",
                         BOUNDS["connrate"], notes))
    value, detail = ratio("connrate", "consulate-native", "socat", "rps")
    rows.append(_row("connections: native >= 3x socat", value, 3.0, True, detail + " conn/s",
                     BOUNDS["connrate"], notes))
    rows.append(_latency_row(results, notes))
    for test, key, what in (("bulk-1", "gbps", "bulk 1 stream"), ("bulk-8", "gbps",
                            "bulk 8 streams"), ("connrate", "rps", "connections"),
                            ("rps-32", "rps", "32 keep-alive connections")):
        value, detail = ratio(test, "consulate-python", "uvloop-minimal", key)
        rows.append(_row(f"Python relay, {what}: >= 0.9x the minimal uvloop proxy", value,
                         0.9, True, detail, BOUNDS["python"], notes))
    return rows, notes


def _latency_row(results: Results, notes: list[str]) -> Row:
    direct = _median(results, "latency-1", "direct", "p50_us")
    native = _median(results, "latency-1", "consulate-native", "p50_us")
    best = _best_haproxy(results, "latency-1", "p50_us", False)
    label = "latency: native's added p50 <= best HAProxy's added p50"
    if direct is None or native is None or best is None:
        return label, "not measured in this run"
    added_native, added_haproxy = native - direct, best[1] - direct
    met = added_native <= added_haproxy
    if not met:
        notes.append(BOUNDS["latency"])
    return label, (f"+{added_native:.0f} µs vs +{added_haproxy:.0f} µs ({best[0]}): "
                   f"{'met' if met else '**missed**'}")

