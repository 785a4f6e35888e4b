"""Tables (Markdown) and charts (PNG) from benchmark repetitions.

Every number is shown as min/median/max over the repetitions and as a ratio of
medians against peers measured in the same run, because the machines are shared
and noisy: absolute numbers move from run to run, ratios much less (PLATFORM.md,
"Measuring").
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # after use("Agg")
from matplotlib.ticker import StrMethodFormatter


@dataclass
class Cell:
    """The repetitions of one test for one variant: one dict of metrics per success."""

    samples: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    status: str = ""  # a word or two for the chart when there is no sample ("failed")

    def values(self, key: str) -> list[float]:
        return [sample[key] for sample in self.samples if key in sample]

    def median(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.median(values) if values else None


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    decimals: int

    def fmt(self, value: float | None) -> str:
        return "—" if value is None else f"{value:,.{self.decimals}f}"


@dataclass(frozen=True)
class Section:
    """One test as the report shows it: a table and a chart; the first metric is the
    one the ratios compare."""

    key: str
    title: str
    metrics: tuple[Metric, ...]  # min/median/max columns, one chart panel each
    chart: str
    extras: tuple[Metric, ...] = ()  # median-only columns (CPU use, side effects)
    added: bool = False  # show the first metric's excess over direct (latency)
    # The peers the first metric's ratios are taken against; empty: direct and the
    # best HAProxy flavour (the TCP benchmark's references).
    versus: tuple[str, ...] = ()


Results = dict[str, dict[str, Cell]]  # section key -> variant -> repetitions


def results_json(results: Results) -> dict[str, dict[str, dict[str, object]]]:
    """Every repetition of every cell, as the results' JSON file keeps them."""
    return {key: {name: dataclasses.asdict(cell) for name, cell in cells.items()}
            for key, cells in results.items()}


def _ratio(value: float | None, ref: float | None) -> str:
    return "—" if value is None or not ref else f"{value / ref:.2f}x"


def _best_haproxy(cells: dict[str, Cell], metric: Metric) -> tuple[str, float] | None:
    """The HAProxy flavour with the best median: the peer a user would tune toward."""
    medians = [(name, m) for name, cell in cells.items()
               if name.startswith("haproxy") and (m := cell.median(metric.key)) is not None]
    if not medians:
        return None
    pick = max if metric.higher_is_better else min
    return pick(medians, key=lambda item: item[1])


def _escape(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def table(section: Section, cells: dict[str, Cell], variants: Sequence[str], reps: int) -> str:
    """A Markdown table with min/median/max per metric and ratios of the first."""
    primary = section.metrics[0]
    direct = cells["direct"].median(primary.key) if "direct" in cells else None
    best = _best_haproxy(cells, primary)
    refs = ([(f"vs {name}", cells[name].median(primary.key) if name in cells else None)
             for name in section.versus] if section.versus else
            [("vs direct", direct),
             (f"vs best HAProxy ({best[0]})" if best else "vs best HAProxy",
              best[1] if best else None)])
    header = ["variant"]
    for metric in section.metrics:
        header += [f"{metric.label} min ({metric.unit})", "median", "max"]
    header += [f"{primary.label} {refs[0][0]}", *(label for label, _ in refs[1:])]
    if section.added:
        header.append(f"added {primary.label} over direct ({primary.unit})")
    header += [f"{extra.label} ({extra.unit}, median)" for extra in section.extras]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for name in variants:
        cell = cells[name]
        if not cell.samples:
            reason = cell.errors[0] if cell.errors else "no result"
            lines.append(f"| {name} | {_escape(reason)} |" + " |" * (len(header) - 2))
            continue
        label = name if len(cell.samples) == reps else f"{name} (n={len(cell.samples)}/{reps})"
        notes += [f"{name}: {_escape(error)}" for error in cell.errors]
        row = [label]
        for metric in section.metrics:
            values = cell.values(metric.key)
            row += [metric.fmt(min(values)), f"**{metric.fmt(statistics.median(values))}**",
                    metric.fmt(max(values))]
        median = cell.median(primary.key)
        row += [_ratio(median, ref) for _, ref in refs]
        if section.added:
            row.append("—" if median is None or direct is None
                       else f"{median - direct:+,.{primary.decimals}f}")
        row += [extra.fmt(cell.median(extra.key)) for extra in section.extras]
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\nFailed repetitions:\n" + "".join(f"- {note}\n" for note in notes)
    return text


_COLOURS = {"direct": "#7f7f7f", "consulate": "#1f77b4", "haproxy": "#ff7f0e",
            "socat": "#2ca02c", "dnsmasq-a-only": "#ffbb78", "dnsmasq": "#ff7f0e",
            "unbound": "#2ca02c"}


def colour(variant: str) -> str:
    """The bar or line colour of a variant, by the peer its name starts with."""
    return next((c for prefix, c in _COLOURS.items() if variant.startswith(prefix)), "#9467bd")


def chart(section: Section, cells: dict[str, Cell], variants: Sequence[str], path: Path) -> None:
    """Bars at the median with min-max error bars, one panel per metric."""
    fig, axes = plt.subplots(1, len(section.metrics),
                             figsize=(4.5 + 3.5 * len(section.metrics), 4.8), squeeze=False)
    positions = range(len(variants))
    for ax, metric in zip(axes[0], section.metrics, strict=True):
        medians, low, high = [], [], []
        for name in variants:
            values = cells[name].values(metric.key)
            mid = statistics.median(values) if values else 0.0
            medians.append(mid)
            low.append(mid - min(values) if values else 0.0)
            high.append(max(values) - mid if values else 0.0)
        ax.bar(positions, medians, yerr=[low, high], capsize=4,
               color=[colour(name) for name in variants], edgecolor="black", linewidth=0.5)
        top = max((m + h for m, h in zip(medians, high, strict=True)), default=0.0) or 1.0
        for x, name, mid, up in zip(positions, variants, medians, high, strict=True):
            text = (metric.fmt(mid) if cells[name].values(metric.key)
                    else cells[name].status or "failed")
            ax.text(x, mid + up + top * 0.01, text, ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, top * 1.15)
        ax.set_xticks(list(positions), list(variants), rotation=30, ha="right", fontsize=9)
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,g}"))
        ax.set_ylabel(f"{metric.label} ({metric.unit})")
        ax.set_xlabel("variant")
        ax.set_title(f"{metric.label}: " + ("higher is better" if metric.higher_is_better
                                             else "lower is better"), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{section.title}\nbars: median, whiskers: min-max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(title: str, preamble: Sequence[tuple[str, Sequence[tuple[str, str]]]],
             sections: Sequence[Section], results: Results, variants: Sequence[str],
             reps: int) -> str:
    """The whole report: key-value blocks (machine, conditions, variants), then one
    table and one chart per section."""
    out = [f"# {title}\n"]
    for heading, rows in preamble:
        out.append(f"\n## {heading}\n\n| | |\n|---|---|\n")
        out += [f"| {_escape(key)} | {_escape(value)} |\n" for key, value in rows]
    for section in sections:
        out.append(f"\n## {section.title}\n\n")
        out.append(table(section, results[section.key], variants, reps))
        out.append(f"\n![{section.title}]({section.chart})\n")
    return "".join(out)
