"""What ``consulate status``, ``services`` and ``routes`` show: one plain view per
command (the ``--json`` output, stable for scripts) built from the agent's API
answers, and its rendering as aligned tables with rich (the default output).

Pure functions: API answers in, views and text out; the commands only fetch.
"""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table

# The proxy counters status shows, in this order: (field, column heading).
_COUNTER_COLUMNS = (
    ("connections_total", "CONNECTIONS"),
    ("connections_active", "ACTIVE"),
    ("connect_failures", "CONNECT FAILS"),
    ("rejected", "REJECTED"),
)
_BYTE_COLUMNS = (("bytes_to_upstream", "SENT"), ("bytes_to_client", "RECEIVED"))
# Shown once the proxy counts them (outlier ejection).
_OPTIONAL_COLUMNS = (("ejections_active", "EJECTED"),)


# -- views: what --json prints --------------------------------------------------------

def services_view(catalog: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Every instance of every service, from ``/v1/catalog/service/<name>`` answers."""
    return [{"service": name, "id": entry["ServiceID"], "address": entry["ServiceAddress"],
             "port": entry["ServicePort"], "tags": list(entry["ServiceTags"])}
            for name, entries in sorted(catalog.items()) for entry in entries]


def routes_view(routes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The route table, from ``/v1/agent/routes``."""
    return [{"service": route["Service"], "vip": route["VIP"],
             "endpoints": [{"id": e["ID"], "address": e["Address"], "port": e["Port"],
                            "node": e["Node"], "weight": e["Weight"], "tags": list(e["Tags"])}
                           for e in route["Endpoints"]]}
            for route in routes]


def status_view(self_info: Mapping[str, Any]) -> dict[str, Any]:
    """The agent, its services (VIP, endpoints, proxy counters) and DNS counters,
    from ``/v1/agent/self``."""
    config, stats = self_info["Config"], self_info["Stats"]
    routes = stats["routes"]["services"]
    counters = stats["proxy"]["services"]
    # Every service gets every counter any service has (0 before its first connection).
    fields = dict.fromkeys(f for f, _ in _COUNTER_COLUMNS + _BYTE_COLUMNS)
    for service_counters in counters.values():
        fields.update(dict.fromkeys(service_counters))
    services = []
    for name in sorted(set(routes) | set(counters)):
        service: dict[str, Any] = {"name": name, "vip": routes.get(name, {}).get("vip", ""),
                                   "endpoints": routes.get(name, {}).get("endpoints", 0)}
        service.update({field: counters.get(name, {}).get(field, 0) for field in fields})
        services.append(service)
    return {
        "node": config["NodeName"], "datacenter": config["Datacenter"],
        "version": config["Version"], "ready": stats["agent"]["ready"],
        "uptime_seconds": stats["agent"]["uptime_seconds"],
        "relay": stats["relay"]["engine"], "route_version": stats["routes"]["version"],
        "services": services, "unrouted": stats["proxy"]["unrouted"],
        "dns_responses": dict(stats.get("dns", {}).get("responses", {})),
        "watch": dict(stats["watch"]),
    }


# -- tables: what a person reads ------------------------------------------------------

def services_table(view: Sequence[Mapping[str, Any]]) -> Table:
    table = _table("SERVICE", "ID", "ADDRESS", "TAGS")
    for row in view:
        table.add_row(row["service"], row["id"], f"{row['address']}:{row['port']}",
                      ",".join(row["tags"]))
    return table


def routes_table(view: Sequence[Mapping[str, Any]]) -> Table:
    """One row per endpoint; a service's name and VIP on its first row only."""
    table = _table("SERVICE", "VIP", "ENDPOINT", "ADDRESS", "NODE", "WEIGHT")
    for route in view:
        first = (route["service"], route["vip"])
        if not route["endpoints"]:
            table.add_row(*first, "(none)", "", "", "")
        for i, e in enumerate(route["endpoints"]):
            table.add_row(*(first if i == 0 else ("", "")), e["id"],
                          f"{e['address']}:{e['port']}", e["node"], str(e["weight"]))
    return table


def status_renderables(view: Mapping[str, Any]) -> list[RenderableType]:
    """A key/value summary of the agent, then its services with their counters."""
    summary = Table.grid(padding=(0, 2))
    summary.add_column(no_wrap=True)
    summary.add_column()
    state = "ready" if view["ready"] else "starting"
    summary.add_row("Node", f"{view['node']} (datacenter {view['datacenter']}, consulate "
                    f"{view['version']}), {state}, up {duration(view['uptime_seconds'])}")
    endpoints = sum(s["endpoints"] for s in view["services"])
    summary.add_row("Routes", f"version {view['route_version']}: "
                    f"{plural(len(view['services']), 'service')}, "
                    f"{plural(endpoints, 'endpoint')}")
    summary.add_row("Proxy", f"relay {view['relay']}, "
                    f"{plural(view['unrouted'], 'connection')} to no VIP")
    responses = ", ".join(f"{rcode} {count}" for rcode, count in
                          sorted(view["dns_responses"].items()))
    summary.add_row("DNS", f"replies {responses}" if responses else "no replies yet")
    watch = view["watch"]
    summary.add_row("Watches", f"{plural(watch['waiters'], 'blocking query', 'blocking queries')}"
                    f", {plural(watch['streams'], 'event stream')}")
    optional = [(f, h) for f, h in _OPTIONAL_COLUMNS if any(f in s for s in view["services"])]
    table = _table("SERVICE", "VIP", "ENDPOINTS", *(h for _, h in _COUNTER_COLUMNS),
                   *(h for _, h in _BYTE_COLUMNS), *(h for _, h in optional),
                   numeric_from=2)
    for s in view["services"]:
        table.add_row(s["name"], s["vip"], str(s["endpoints"]),
                      *(str(s.get(f, 0)) for f, _ in _COUNTER_COLUMNS),
                      *(human_bytes(s.get(f, 0)) for f, _ in _BYTE_COLUMNS),
                      *(str(s.get(f, 0)) for f, _ in optional))
    return [summary, "", table]


def _table(*headings: str, numeric_from: int | None = None) -> Table:
    """Borderless, two spaces between columns, headings in bold on a terminal; columns
    from ``numeric_from`` on are right-aligned (counts)."""
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold",
                  show_edge=False)
    for i, heading in enumerate(headings):
        right = numeric_from is not None and i >= numeric_from
        table.add_column(heading, no_wrap=True, justify="right" if right else "left")
    return table


def render(renderables: Iterable[RenderableType], width: int | None = None,
           color: bool | None = None) -> str:
    """Text of ``renderables``. On a terminal: its width, with color unless NO_COLOR
    is set; otherwise (a pipe, a file) wide enough that no row wraps, no color.
    Trailing spaces are dropped, so the output diffs and greps cleanly."""
    terminal = sys.stdout.isatty()
    if width is None:
        width = shutil.get_terminal_size().columns if terminal else 10_000
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=terminal if color is None
                      else color, no_color=None if color is None else not color,
                      highlight=False, soft_wrap=False)
    for renderable in renderables:
        console.print(renderable)
    return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())


# -- units ------------------------------------------------------------------------

def human_bytes(count: int) -> str:
    """1023 B, 1.0 KiB, 5.9 MiB: binary units, one decimal above bytes."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def duration(seconds: float) -> str:
    """45s, 3m12s, 2h03m, 4d06h: the two largest units."""
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    return f"{count} {singular if count == 1 else plural_form or singular + 's'}"
