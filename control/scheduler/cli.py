"""``consulate job ...`` and ``consulate alloc ...``: Nomad's commands over the agent's API.

    consulate job run FILE       submit (JSON or TOML; checked here first, so a bad
                                 file fails with the field named and nothing sent)
    consulate job status [NAME]  the job's summary and allocations (every job without NAME)
    consulate job stop NAME      stop its allocations
    consulate alloc status ID    an allocation and its history
    consulate alloc explain ID   why it went where it went

Exit codes as Nomad's: 0 done, 1 error, 2 from ``job run`` when some allocations
could not be placed (the job stays pending with the reason printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from consulate.control.client import AgentClient, client_for
from consulate.control.scheduler.explain import render as render_explanation
from consulate.control.scheduler.explain import text_table
from consulate.control.scheduler.service import SUMMARY_COLUMNS
from consulate.control.scheduler.spec import JobSpecError, parse_job

PLACEMENT_FAILED = 2


def add_scheduler_parsers(sub: Any, add_http_flag: Callable[[argparse.ArgumentParser],
                                                            None]) -> None:
    job = sub.add_parser("job", help="run, inspect and stop scheduled jobs (Nomad's "
                                     "job commands)")
    job_sub = job.add_subparsers(dest="job_command", metavar="COMMAND", required=True)
    alloc = sub.add_parser("alloc", help="inspect allocations (Nomad's alloc commands)")
    alloc_sub = alloc.add_subparsers(dest="alloc_command", metavar="COMMAND", required=True)

    def command(group: Any, name: str, help: str,
                func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help)
        add_http_flag(p)
        p.set_defaults(func=func)
        return p

    command(job_sub, "run", "submit a job file (JSON or TOML)", _run).add_argument(
        "file", help="the job file; - reads standard input")
    command(job_sub, "status", "a job's status (every job without NAME)",
            _status).add_argument("name", nargs="?")
    command(job_sub, "stop", "stop a job's allocations", _stop).add_argument("name")
    command(alloc_sub, "status", "an allocation and its history",
            _alloc_status).add_argument("id", help="allocation id or a unique prefix")
    command(alloc_sub, "explain", "why an allocation went where it went",
            _alloc_explain).add_argument("id", help="allocation id or a unique prefix")


def _client(args: argparse.Namespace) -> AgentClient:
    return client_for(args)


def _read(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def _run(args: argparse.Namespace) -> int:
    text = _read(args.file)
    try:
        job = parse_job(text, format="toml" if args.file.endswith(".toml") else "auto")
    except JobSpecError as exc:
        print(f"Error parsing job file {args.file}: {exc}")
        return 1
    result = _client(args).request("PUT", "/v1/jobs", dict(job.source))
    print(render_submission(result))
    return PLACEMENT_FAILED if result["unplaced"] else 0


def render_submission(result: Mapping[str, Any], done: str = "submitted") -> str:
    """What ``job run`` (and ``job stop``, with ``done="stopped"``) prints."""
    lines = [f'==> Job "{result["job"]}" {done}']
    lines += [f'    Allocation "{a["id"][:8]}" created: node "{a["node"]}", name "{a["name"]}"'
              for a in result["placed"]]
    lines += [f'    Allocation "{a[:8]}" stopped' for a in result["stopped"]]
    if result["unplaced"]:
        lines.append("==> Placement Failure")
        for group, count in result["unplaced"].items():
            lines.append(f'    Task Group "{group}" ({count} unplaced):')
            failure = result["placement_failures"][group]
            lines += [f'      * {reason}: {n} node{"s" * (n != 1)}'
                      for reason, n in failure["filtered"].items()]
            if not failure["nodes_evaluated"]:
                lines.append("      * no node is registered")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.name is None:
        jobs = client.request("GET", "/v1/jobs")
        if not jobs:
            print("No running jobs")
            return 0
        print("\n".join(text_table([["ID", "Type", "Status"],
                                *([j["name"], j["type"], j["status"]] for j in jobs)])))
        return 0
    print(render_job_status(client.request("GET", f"/v1/job/{args.name}"), time.time()))
    return 0


def render_job_status(status: Mapping[str, Any], now: float) -> str:
    """``nomad job status NAME``'s layout."""
    submitted = status["submitted"]
    lines = [f"ID            = {status['name']}", f"Name          = {status['name']}",
             "Submit Date   = " + (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(submitted))
                                   if submitted else "-"),
             f"Type          = {status['type']}", f"Strategy      = {status['strategy']}",
             f"Status        = {status['status']}", "", "Summary"]
    rows = [["Task Group", *(c.capitalize() for c in SUMMARY_COLUMNS)]]
    rows += [[group, *(str(counts[c]) for c in SUMMARY_COLUMNS)]
             for group, counts in status["summary"].items()]
    lines += text_table(rows)
    for group, failure in status["placement_failures"].items():
        lines += ["", "Placement Failure", f'Task Group "{group}":']
        lines += [f"  * {reason}: {n} node{'s' * (n != 1)}"
                  for reason, n in failure["filtered"].items()]
        if not failure["nodes_evaluated"]:
            lines.append("  * no node is registered")
    allocations = status["allocations"]
    lines += ["", "Allocations"]
    if not allocations:
        lines.append("No allocations placed")
        return "\n".join(lines)
    rows = [["ID", "Node ID", "Task Group", "Desired", "Status", "Created"]]
    rows += [[a["id"][:8], a["node"], a["group"], a["desired"], a["status"],
              _ago(a["history"][0]["at"], now) if a["history"] else "-"] for a in allocations]
    return "\n".join(lines + text_table(rows))


def _ago(at: float, now: float) -> str:
    seconds = max(0, int(now - at))
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60}s ago"
    return f"{seconds // 3600}h{seconds % 3600 // 60}m ago"


def _stop(args: argparse.Namespace) -> int:
    result = _client(args).request("DELETE", f"/v1/job/{args.name}")
    print(render_submission(result, "stopped"))
    return 0


def _alloc_status(args: argparse.Namespace) -> int:
    a = _client(args).request("GET", f"/v1/allocation/{args.id}")
    lines = [f"ID            = {a['id']}", f"Name          = {a['name']}",
             f"Node ID       = {a['node']}", f"Job ID        = {a['job']}",
             f"Desired       = {a['desired']}", f"Client Status = {a['status']}",
             f"Restarts      = {a['restarts']}",
             "Ports         = " + (", ".join(f"{k}={v}" for k, v in a["ports"].items()) or "-"),
             "", "Recent Events:"]
    rows = [["Time", "Status", "Description"]]
    rows += [[time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h["at"])), h["status"],
              h["detail"]] for h in a["history"]]
    print("\n".join(lines + text_table(rows)))
    return 0


def _alloc_explain(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", f"/v1/allocation/{args.id}/explain")
    print(f"ID          = {data['id']}\nName        = {data['name']}")
    print(render_explanation(data))
    return 0

