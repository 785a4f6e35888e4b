"""``consulate status``, ``services`` and ``routes``: read the agent's API, print a
table (or, with ``--json``, the view scripts rely on; see cli_format)."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote

from consulate.control import cli_format
from consulate.control.client import client_for


def _emit(args: argparse.Namespace, view: Any, renderables: list[Any]) -> int:
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        print(cli_format.render(renderables), end="")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    view = cli_format.status_view(client_for(args).request("GET", "/v1/agent/self"))
    return _emit(args, view, cli_format.status_renderables(view))


def cmd_services(args: argparse.Namespace) -> int:
    client = client_for(args)
    catalog = {name: client.request("GET", f"/v1/catalog/service/{quote(name, safe='')}")
               for name in client.request("GET", "/v1/catalog/services")}
    view = cli_format.services_view(catalog)
    return _emit(args, view, [cli_format.services_table(view)])


def cmd_routes(args: argparse.Namespace) -> int:
    view = cli_format.routes_view(client_for(args).request("GET", "/v1/agent/routes"))
    return _emit(args, view, [cli_format.routes_table(view)])


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print JSON for scripts instead of a table")
