"""The soak's report (bench/soak.py): verdicts on growth and errors, latencies per
window, plots.

Growth is judged on halves, not on a fitted line: after a warm-up (allocator
arenas, caches and the first connections' buffers grow once), the samples are cut
in two halves and the median of the last half must not exceed the median of the
first by more than a tolerance. Medians make one sample taken during a burst
(a GC cycle, a connection in flight) irrelevant; a leak, which grows with the work
done, shows as a difference between halves that the report converts into the
smallest leak per connection it would have caught. The least-squares slope is
reported too, as a second look. The analysis is pure (tested without a lab).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # after use("Agg")

from bench.machine import cpu_model
from bench.watchers import percentile

if TYPE_CHECKING:
    from bench.soak import Run

# The agent's RSS moves by a few hundred KiB between samples (GC, buffers of the
# connections in flight) and its allocator keeps warming up for a while: 30,000
# register/deregister rounds on one agent level off at +2.9 MiB after about 10,000,
# with unique ids or reused ones alike. 4 MiB between the halves' medians stays
# above both and still catches a leak of about 1.5 KB per proxied connection in a
# 10-minute run (the report computes the figure for its own run).
RSS_TOLERANCE_KIB = 4096.0
# Every proxied connection in flight holds 2 fds (client and backend side) and
# the load keeps at most one per client in flight: 4 fds is that jitter.
FD_TOLERANCE = 4.0
WARMUP_SHARE, WARMUP_MAX = 0.1, 60.0  # of the run, in seconds: left out of the verdict
ERRORS_SHOWN = 20


def warmup(seconds: float) -> float:
    return min(WARMUP_MAX, WARMUP_SHARE * seconds)


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of value against seconds, per minute (0 for < 2 points)."""
    if len(points) < 2:
        return 0.0
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return 0.0
    return 60 * sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


@dataclass(frozen=True)
class Growth:
    """How one series (an agent's RSS or fds) moved over the run."""

    start: float
    end: float
    first_half: float  # median of the samples after the warm-up, first half
    last_half: float  # ... last half
    span_minutes: float  # between the middles of the two halves
    slope_per_minute: float  # least squares over the samples after the warm-up
    tolerance: float

    @property
    def growth(self) -> float:
        return self.last_half - self.first_half

    @property
    def flat(self) -> bool:
        return self.growth <= self.tolerance


def growth(points: Sequence[tuple[float, float]], tolerance: float, skip: float) -> Growth:
    """Judge ``points`` ((seconds, value), in time order), leaving out the first ``skip``
    seconds (all of them are kept when fewer than 2 remain)."""
    if not points:
        raise ValueError("no samples to judge growth on")
    kept = [p for p in points if p[0] >= skip]
    kept = kept if len(kept) >= 2 else list(points)
    half = max(1, len(kept) // 2)
    first, last = kept[:half], kept[half:] or kept[-1:]
    middle = (statistics.median(x for x, _ in last) - statistics.median(x for x, _ in first))
    return Growth(points[0][1], points[-1][1], statistics.median(y for _, y in first),
                  statistics.median(y for _, y in last), middle / 60, slope(kept), tolerance)


@dataclass(frozen=True)
class Stats:
    """The operations that started in one window."""

    count: int
    errors: int
    p50_ms: float | None  # over the successful ones
    p99_ms: float | None


def stats(records: Sequence[dict[str, Any]], key: str = "ms") -> Stats:
    good = [float(r[key]) for r in records if r["ok"]]
    return Stats(len(records), len(records) - len(good),
                 percentile(good, 0.50) if good else None,
                 percentile(good, 0.99) if good else None)


@dataclass(frozen=True)
class Window:
    start: float  # seconds since the load started
    end: float
    echo: Stats
    dns: Stats
    backend_cycles: int  # churned backends that came and went, ended in this window
    api_writes: int  # API churn rounds (a register and a deregister)
    load1: float | None  # the machine's 1-minute load average, highest sample in the window


def windows(run: Run, width: float) -> list[Window]:
    """The run cut in windows of ``width`` seconds (the last one may be shorter)."""
    out = []
    start = 0.0
    while start < run.seconds:
        end = min(run.seconds, start + width)
        last = end >= run.seconds

        def inside(records: list[dict[str, Any]], s: float = start, e: float = end,
                   closed: bool = last) -> list[dict[str, Any]]:
            return [r for r in records
                    if s <= r["t"] - run.started < e or (closed and r["t"] - run.started >= e)]

        churn = Counter(r["kind"] for r in inside(run.churn) if r["ok"])
        loads = [s["load1"] for s in run.samples if start <= s["t"] < end or (last and
                                                                             s["t"] >= end)]
        out.append(Window(start, end, stats(inside(run.echo)), stats(inside(run.dns)),
                          churn["backend"], churn["api"], max(loads, default=None)))
        start = end
    return out


def summary(run: Run) -> dict[str, Any]:
    """Totals, verdicts and the growth of every agent: what soak.json's head holds."""
    skip = warmup(run.seconds)
    agents = {}
    for host in sorted(run.samples[0]["agents"]):
        series = {key: [(s["t"], float(s["agents"][host][key])) for s in run.samples]
                  for key in ("rss_kib", "fds")}
        judged = {"rss_kib": growth(series["rss_kib"], RSS_TOLERANCE_KIB, skip),
                  "fds": growth(series["fds"], FD_TOLERANCE, skip)}
        agents[host] = {key: {**asdict(g), "growth": g.growth, "flat": g.flat}
                        for key, g in judged.items()}
    churn = Counter((r["kind"], r["ok"]) for r in run.churn)
    errors = [f"{kind}: {r.get('error')}" for kind in ("echo", "dns")
              for r in getattr(run, kind) if not r["ok"]]
    return {
        "echo": {**asdict(stats(run.echo)),
                 "by_backend": dict(Counter(r["id"] for r in run.echo if r["ok"]))},
        "resolve": asdict(stats(run.echo, "resolve_ms")),
        "dns": asdict(stats(run.dns)),
        "churn": {"backend_cycles": churn[("backend", True)],
                  "api_rounds": churn[("api", True)],
                  "failed": [r["error"] for r in run.churn if not r["ok"]]},
        "live_endpoint_errors": len(errors),
        "errors_shown": errors[:ERRORS_SHOWN],
        "agents": agents,
        "flat": all(v["flat"] for a in agents.values() for v in a.values()),
    }


# -- Markdown and plots --------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _machine() -> list[tuple[str, str]]:
    model = cpu_model()
    etcd = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout
    return [("cores", f"{os.cpu_count()} x {model}"), ("kernel (uname -r)", platform.release()),
            ("python", platform.python_version()),
            ("etcd", etcd.splitlines()[0] if etcd else "not installed")]


def _rows(rows: Sequence[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def markdown(run: Run, head: dict[str, Any], width: float, command: str, hold: float) -> str:
    echo, dns = head["echo"], head["dns"]
    skip = warmup(run.seconds)
    per_connection = run.rates["echo"] * 60  # connections per minute through h1's proxy
    conditions = [
        ("date (UTC)", datetime.datetime.fromtimestamp(run.started, datetime.UTC)
         .strftime("%Y-%m-%d %H:%M")),
        ("command", f"`{command}`"),
        ("lab", "3 hosts (network namespaces on one fabric bridge, no route out), 2 "
                "containers each, one `consulate agent` per host"),
        ("registry", "3-member etcd cluster, one member per host, every agent on all three"
         if run.registry == "etcd" else "embedded in h1's agent, h2 and h3 `--join`-ed to it"),
        ("connections by name", f"2 clients (h1c1 through h1's proxy, h3c2 through h3's), "
                                f"{run.rates['echo']:g}/s each: resolve `echo.service.consul` "
                                "(the container's resolver: its host's agent), connect to the "
                                "VIP, echo 1-4096 seeded bytes, half-close, check byte for "
                                "byte; backends echo-h2 (h2c1), echo-h3 (h3c1) and the "
                                "churned one (h2c2)"),
        ("DNS", f"a prober in h1c2, {run.rates['dns']:g} queries/s to h1's agent "
                "(A (exactly the VIP) and SRV `_echo._tcp.service.consul` "
                "(NOERROR, >= 2 records) in turn), 5 s timeout"),
        ("churn", f"a backend in h2c2 started, registered through h2's agent (id "
                  f"`echo-churn-N`), held {hold:g} s in every route table, deregistered, "
                  "killed once every agent's route table has dropped it (+1 s), 2 s pause, "
                  f"again; and through h3's agent, every second, an instance of service "
                  "`churn` registered and the previous one deregistered"),
        ("errors", "every failed connection or query counts: a churned backend is killed "
                   "only after it left every route table, so every endpoint the proxies "
                   "could pick was registered and alive"),
        ("sampling", f"each agent's VmRSS (`/proc/PID/status`) and open fds (`/proc/PID/fd`) "
                     f"every {run.sample:g} s (the etcd members are not consulate's and "
                     f"are not sampled); latency windows of {width:g} s (p50/p99 of "
                     "the successful operations started in the window, nearest rank)"),
        ("machine", "shared with other engineers' jobs (tests, fuzzing, benchmarks) on 2 "
                    "cores while it ran: latencies include their load; 1-minute load average "
                    f"at the start / end: {run.load[0]:.1f} / {run.load[1]:.1f}"),
    ]
    out = ["# Soak: the mesh under steady load", "", "## Machine", "", *_rows(_machine()),
           "", "## Conditions", "", *_rows(conditions), "", "## Verdict", ""]
    errors = head["live_endpoint_errors"]
    growing = [f"{host} {'RSS' if key == 'rss_kib' else 'fds'}"
               for host, series in head["agents"].items()
               for key, judged in series.items() if not judged["flat"]]
    out += [f"- errors on live endpoints: **{errors}** ({echo['errors']} of {echo['count']:,} "
            f"connections, {dns['errors']} of {dns['count']:,} DNS queries): "
            f"**{'PASS' if errors == 0 else 'FAIL'}** (must be 0)",
            f"- memory and fds: **{'flat on every agent' if head['flat'] else 'GROWING'}**"
            f"{'' if head['flat'] else ' (' + ', '.join(growing) + ')'} "
            f"(see below; rule: median of the last half of the samples after a "
            f"{skip:g} s warm-up <= median of the first half + tolerance)",
            f"- churn: {head['churn']['backend_cycles']} backend cycles, "
            f"{head['churn']['api_rounds']} API register/deregister rounds, "
            f"{len(head['churn']['failed'])} churn steps failed",
            f"- name resolution before each connection (glibc, through the container's "
            f"agent): p50 {_ms(head['resolve']['p50_ms'])} ms, p99 "
            f"{_ms(head['resolve']['p99_ms'])} ms over the run; connect+echo: p50 "
            f"{_ms(echo['p50_ms'])} ms, p99 {_ms(echo['p99_ms'])} ms; DNS prober: p50 "
            f"{_ms(dns['p50_ms'])} ms, p99 {_ms(dns['p99_ms'])} ms",
            "- connections per backend: " + ", ".join(
                f"{k} {v:,}" for k, v in sorted(echo["by_backend"].items())),
            "", "## Memory and file descriptors per agent", "",
            "| agent | series | start | end | first-half median | last-half median | "
            "growth | tolerance | slope (least squares, per min) | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for host, series in head["agents"].items():
        for key, unit, scale in (("rss_kib", "MiB", 1 / 1024), ("fds", "fds", 1.0)):
            g = series[key]
            out.append(f"| {host} | {'RSS' if key == 'rss_kib' else 'open fds'} | "
                       f"{g['start'] * scale:.1f} | {g['end'] * scale:.1f} | "
                       f"{g['first_half'] * scale:.1f} | {g['last_half'] * scale:.1f} | "
                       f"{g['growth'] * scale:+.1f} {unit} | "
                       f"{g['tolerance'] * scale:.0f} {unit} | "
                       f"{g['slope_per_minute'] * scale:+.3f} {unit} | "
                       f"{'flat' if g['flat'] else '**GROWING**'} |")
    span = head["agents"]["h1"]["rss_kib"]["span_minutes"]
    if span > 0:
        caught = RSS_TOLERANCE_KIB * 1024 / (per_connection * span)
        out += ["", f"The halves' middles are {span:.1f} min apart: at {run.rates['echo']:g} "
                f"connections/s through h1's proxy, the {RSS_TOLERANCE_KIB / 1024:g} MiB "
                f"tolerance catches a leak of more than {caught:,.0f} bytes per connection "
                "(less per operation counting its DNS queries and registrations)."]
    out += ["", f"## Load and latency per {width:g} s window", "",
            "| window (s) | connections | errors | connect+echo p50 (ms) | p99 | DNS queries | "
            "errors | DNS p50 (ms) | p99 | backend cycles | API churn rounds | machine load "
            "(1-min avg, max) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in windows(run, width):
        out.append(f"| {w.start:.0f}-{w.end:.0f} | {w.echo.count} | {w.echo.errors} | "
                   f"{_ms(w.echo.p50_ms)} | {_ms(w.echo.p99_ms)} | {w.dns.count} | "
                   f"{w.dns.errors} | {_ms(w.dns.p50_ms)} | {_ms(w.dns.p99_ms)} | "
                   f"{w.backend_cycles} | {w.api_writes} | "
                   f"{'—' if w.load1 is None else f'{w.load1:.1f}'} |")
    out += ["", "![RSS and open fds of every agent](soak-memory.png)", "",
            "![p50/p99 per window](soak-latency.png)", ""]
    if head["errors_shown"] or head["churn"]["failed"]:
        out += ["## Errors (first ones)", "",
                *(f"- {e}" for e in head["errors_shown"]),
                *(f"- churn: {e}" for e in head["churn"]["failed"][:ERRORS_SHOWN]), ""]
    return "\n".join(out)


def plots(run: Run, width: float, output: Path) -> None:
    skip = warmup(run.seconds)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    minutes = [s["t"] / 60 for s in run.samples]
    for host in sorted(run.samples[0]["agents"]):
        rss = [s["agents"][host]["rss_kib"] / 1024 for s in run.samples]
        axes[0].plot(minutes, rss, label=host)
        axes[1].plot(minutes, [r - rss[0] for r in rss], label=host)
        axes[2].plot(minutes, [s["agents"][host]["fds"] for s in run.samples], label=host)
    axes[1].axhline(RSS_TOLERANCE_KIB / 1024, color="red", linestyle=":", linewidth=1,
                    label="tolerance (between the halves' medians)")
    for ax, label in zip(axes, ("RSS (MiB)", "RSS change since the first sample (MiB)",
                                "open fds"), strict=True):
        ax.axvspan(0, skip / 60, color="#cccccc", alpha=0.5, label="warm-up (not judged)")
        ax.set_xlabel("minutes into the soak")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(bottom=0)
    axes[2].set_ylim(bottom=0)
    fig.suptitle("every agent's memory and fds under steady load and churn", fontsize=11)
    fig.tight_layout()
    fig.savefig(output / "soak-memory.png", dpi=110)
    plt.close(fig)

    cut = windows(run, width)
    middles = [(w.start + w.end) / 120 for w in cut]
    minutes = [s["t"] / 60 for s in run.samples]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind, title in ((axes[0], "echo", "connect+echo through the proxy, by name"),
                            (axes[1], "dns", "DNS query to the agent (A, SRV)")):
        for pct, style in (("p50_ms", "-o"), ("p99_ms", "--s")):
            ax.plot(middles, [getattr(getattr(w, kind), pct) for w in cut], style,
                    markersize=3, label=pct.split("_")[0])
        failed = [(m, getattr(w, kind).errors) for m, w in zip(middles, cut, strict=True)
                  if getattr(w, kind).errors]
        if failed:
            ax.plot([m for m, _ in failed], [0] * len(failed), "rx", label="window with errors")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("minutes into the soak")
        ax.set_ylabel(f"ms per {width:g} s window")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        load = ax.twinx()  # the shared machine's load: where the tail comes from
        load.plot(minutes, [s["load1"] for s in run.samples], color="#999999", linewidth=0.8,
                  label="machine load (1-min avg)")
        load.set_ylabel("machine load (1-min avg)", color="#777777")
        load.set_ylim(bottom=0)
        load.legend(fontsize=8, loc="upper right")
    fig.suptitle("latency over time (successful operations)", fontsize=11)
    fig.tight_layout()
    fig.savefig(output / "soak-latency.png", dpi=110)
    plt.close(fig)


def write(run: Run, output: Path, width: float, command: str, hold: float) -> str:
    """soak.md, soak.json and the two plots in ``output``; returns a one-line summary."""
    head = summary(run)
    (output / "soak.md").write_text(markdown(run, head, width, command, hold))
    body = {"summary": head, "seconds": run.seconds, "registry": run.registry,
            "rates": run.rates, "samples": run.samples,
            "windows": [asdict(w) for w in windows(run, width)]}
    (output / "soak.json").write_text(json.dumps(body, indent=1) + "\n")
    plots(run, width, output)
    return (f"soak: {head['echo']['count']} connections, {head['dns']['count']} DNS queries, "
            f"{head['live_endpoint_errors']} errors, memory/fds "
            f"{'flat' if head['flat'] else 'GROWING'}; wrote {output}/soak.md")
