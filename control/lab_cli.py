"""``consulate lab ...``: build, inspect, use and remove namespace labs.

A thin shell over consulate.control.lab: every handler returns an exit code and
reports failures as one ``consulate: error: ...`` line on stderr; only the
program's ``main`` exits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable

from consulate.control import lab

Handler = Callable[[argparse.Namespace], int]


def add_lab_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lab`` with its subcommands; each sets ``func(args) -> exit code``."""
    parser = subparsers.add_parser(
        "lab", help="network namespaces standing in for hosts and containers",
        description="Build labs of network namespaces: a fabric bridge, hosts "
                    "(10.99.0.10+i) and containers (10.100.i.10+j). Needs root.",
    )
    sub = parser.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="build a lab and print its name")
    p.add_argument("--hosts", type=int, default=1, help="number of hosts (default: 1)")
    p.add_argument("--containers", type=int, default=3,
                   help="containers per host (default: 3)")
    p.add_argument("--name", help="lab name, starting with 'consulate-' "
                                   "(default: consulate-<6 random hex digits>)")
    p.set_defaults(func=_guarded(_cmd_up))

    p = sub.add_parser("down", help="remove a lab (or all labs) and its processes")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", metavar="NAME", help="lab to remove")
    which.add_argument("--all", action="store_true",
                       help="remove every lab, including leftovers of crashed runs")
    p.set_defaults(func=_guarded(_cmd_down))

    p = sub.add_parser("exec", help="run a command inside a lab host or container",
                       usage="%(prog)s NAME WHERE -- CMD...")
    p.add_argument("name", metavar="NAME", help="lab name")
    p.add_argument("where", metavar="WHERE", help="h<i>, h<i>c<j> or fabric")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="command to run")
    p.set_defaults(func=_guarded(_cmd_exec))

    p = sub.add_parser("status", help="list labs with their namespaces and addresses")
    p.add_argument("name", nargs="?", metavar="NAME", help="show only this lab")
    p.set_defaults(func=_guarded(_cmd_status))


class _UsageError(Exception):
    """The user asked for something impossible; the message says what to do."""


def _guarded(handler: Handler) -> Handler:
    """Turn expected failures into one stderr line and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            if os.geteuid() != 0 or shutil.which("ip") is None:
                raise _UsageError("labs need network namespaces: "
                                  "run as root with iproute2 installed")
            return handler(args)
        except (_UsageError, lab.LabError, ValueError, OSError) as exc:
            print(f"consulate: error: {exc}", file=sys.stderr)
            return 1

    return run


def _table(the_lab: lab.Lab) -> str:
    rows = the_lab.members()
    widths = [max(len(row[k]) for row in rows) for k in (0, 1)]
    return "\n".join(f"  {short:<{widths[0]}}  {netns:<{widths[1]}}  {addr}"
                     for short, netns, addr in rows)


def _cmd_up(args: argparse.Namespace) -> int:
    # Progress on stderr, so that stdout stays the lab's name and table for scripts.
    count = args.hosts * (1 + args.containers) + 1
    print(f"building a lab: {args.hosts} host(s) x {args.containers} container(s), "
          f"{count} network namespaces...", end="", file=sys.stderr, flush=True)
    started = time.monotonic()
    built = lab.up(hosts=args.hosts, containers=args.containers, name=args.name)
    print(f" done ({time.monotonic() - started:.1f} s)", file=sys.stderr)
    print(built.name)
    print(_table(built))
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    if args.all:
        for name in lab.down_all():
            print(f"removed {name}")
    elif lab.down(args.name):
        print(f"removed {args.name}")
    else:
        print(f"consulate: no lab named {args.name}: nothing to remove", file=sys.stderr)
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise _UsageError("nothing to run: put the command after '--', "
                          f"e.g. consulate lab exec {args.name} {args.where} -- ip addr")
    code: int = lab.load(args.name).exec(args.where, cmd).returncode
    # Like a shell: a command killed by signal N exits 128+N.
    return 128 - code if code < 0 else code


def _cmd_status(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else lab.list_labs()
    if not names:
        print("no labs (build one with `consulate lab up`)")
    for name in names:
        try:
            print(f"{name}\n{_table(lab.load(name))}")
        except lab.LabError:
            leftovers = lab.namespaces_of(name)
            if not leftovers:
                raise
            print(f"{name}  (no state file: left by a crashed run; "
                  f"remove it with `consulate lab down {name}`)")
            print("\n".join(f"  {netns}" for netns in sorted(leftovers)))
    return 0

