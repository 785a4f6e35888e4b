"""``consulate status``, ``services`` and ``routes``: exact tables and ``--json`` for a
known state, first from fixed API answers (pure), then against a real agent in a
lab host, and the one-line error when no agent answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cli import consulate

from consulate.control import cli_format
from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent

SELF_INFO: dict[str, Any] = {
    "Config": {"Datacenter": "dc1", "NodeName": "h1", "Version": "0.1.0"},
    "Stats": {
        "agent": {"ready": True, "uptime_seconds": 3725.4},
        "routes": {"version": 9, "services": {
            "db": {"vip": "244.211.181.161", "endpoints": 1},
            "web": {"vip": "246.250.66.196", "endpoints": 2}}},
        "proxy": {"unrouted": 1, "services": {
            "gone": {"connections_total": 1, "connections_active": 0, "connect_failures": 0,
                     "rejected": 1, "bytes_to_upstream": 0, "bytes_to_client": 0,
                     "ejections_active": 0},
            "web": {"connections_total": 1200, "connections_active": 3,
                    "connect_failures": 17, "rejected": 0, "bytes_to_upstream": 1536,
                    "bytes_to_client": 52428800, "ejections_active": 1}}},
        "watch": {"services": 1, "waiters": 2, "streams": 1},
        "relay": {"engine": "native"},
        "dns": {"responses": {"NXDOMAIN": 2, "NOERROR": 40}},
    },
}


def render(renderables: list[Any]) -> str:
    return cli_format.render(renderables, width=120, color=False)


def test_status_table() -> None:
    view = cli_format.status_view(SELF_INFO)
    assert render(cli_format.status_renderables(view)).splitlines() == [
        "Node     h1 (datacenter dc1, consulate 0.1.0), ready, up 1h02m",
        "Routes   version 9: 3 services, 3 endpoints",
        "Proxy    relay native, 1 connection to no VIP",
        "DNS      replies NOERROR 40, NXDOMAIN 2",
        "Watches  2 blocking queries, 1 event stream",
        "",
        "SERVICE  VIP              ENDPOINTS  CONNECTIONS  ACTIVE  CONNECT FAILS  REJECTED   "
        "  SENT  RECEIVED  EJECTED",
        "db       244.211.181.161          1            0       0              0         0   "
        "   0 B       0 B        0",
        "gone                              0            1       0              0         1   "
        "   0 B       0 B        0",
        "web      246.250.66.196           2         1200       3             17         0  "
        "1.5 KiB  50.0 MiB        1",
    ]


def test_status_json_fills_every_counter_for_every_service() -> None:
    zero = {"connections_total": 0, "connections_active": 0, "connect_failures": 0,
            "rejected": 0, "bytes_to_upstream": 0, "bytes_to_client": 0, "ejections_active": 0}
    assert cli_format.status_view(SELF_INFO) == {
        "node": "h1", "datacenter": "dc1", "version": "0.1.0", "ready": True,
        "uptime_seconds": 3725.4, "relay": "native", "route_version": 9,
        "services": [
            {"name": "db", "vip": "244.211.181.161", "endpoints": 1, **zero},
            {"name": "gone", "vip": "", "endpoints": 0,
             **SELF_INFO["Stats"]["proxy"]["services"]["gone"]},
            {"name": "web", "vip": "246.250.66.196", "endpoints": 2,
             **SELF_INFO["Stats"]["proxy"]["services"]["web"]},
        ],
        "unrouted": 1, "dns_responses": {"NXDOMAIN": 2, "NOERROR": 40},
        "watch": {"services": 1, "waiters": 2, "streams": 1},
    }


def test_status_without_traffic_or_ejections_has_no_ejected_column() -> None:
    info = json.loads(json.dumps(SELF_INFO))
    info["Stats"]["proxy"] = {"unrouted": 0, "services": {}}
    info["Stats"]["dns"] = {"responses": {}}
    info["Stats"]["agent"] = {"ready": False, "uptime_seconds": 59.9}
    lines = render(cli_format.status_renderables(cli_format.status_view(info))).splitlines()
    assert lines[0] == "Node     h1 (datacenter dc1, consulate 0.1.0), starting, up 59s"
    assert lines[3] == "DNS      no replies yet"
    assert lines[6] == ("SERVICE  VIP              ENDPOINTS  CONNECTIONS  ACTIVE  "
                        "CONNECT FAILS  REJECTED  SENT  RECEIVED")


def test_routes_table_one_row_per_endpoint() -> None:
    routes = [
        {"Service": "db", "VIP": "244.211.181.161", "Endpoints": []},
        {"Service": "web", "VIP": "246.250.66.196", "Endpoints": [
            {"ID": "web-1", "Address": "10.0.0.5", "Port": 8080, "Node": "h1", "Weight": 3,
             "Tags": ["v1"]},
            {"ID": "web-2", "Address": "10.0.0.6", "Port": 8080, "Node": "h2", "Weight": 1,
             "Tags": []}]},
    ]
    assert render([cli_format.routes_table(cli_format.routes_view(routes))]).splitlines() == [
        "SERVICE  VIP              ENDPOINT  ADDRESS        NODE  WEIGHT",
        "db       244.211.181.161  (none)",
        "web      246.250.66.196   web-1     10.0.0.5:8080  h1    3",
        "                          web-2     10.0.0.6:8080  h2    1",
    ]


def test_color_only_when_asked() -> None:
    table = cli_format.services_table([])
    assert cli_format.render([table], width=40, color=False) == "SERVICE  ID  ADDRESS  TAGS\n"
    colored = cli_format.render([table], width=40, color=True)
    assert colored.startswith("\x1b[1mSERVICE\x1b[0m")  # headings in bold
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored) == "SERVICE  ID  ADDRESS  TAGS\n"


@pytest.mark.parametrize(("count", "shown"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (5 * 1024**2, "5.0 MiB"), (3 * 1024**4, "3.0 TiB"), (2048 * 1024**4, "2048.0 TiB")])
def test_human_bytes(count: int, shown: str) -> None:
    assert cli_format.human_bytes(count) == shown


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.4, "0s"), (59.9, "59s"), (60, "1m00s"), (3725, "1h02m"), (90061, "1d01h")])
def test_duration(seconds: float, shown: str) -> None:
    assert cli_format.duration(seconds) == shown


# -- against a real agent in a lab host ------------------------------------------------

@pytest.fixture(scope="module")
def status_lab(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[labmod.Lab, LabAgent]]:
    work = tmp_path_factory.mktemp("status")
    with labmod.up(hosts=1, containers=1) as built:
        agent = LabAgent(built, 1, work / "data", work / "agent.log",
                         extra_args=["--relay", "python"]).start()
        try:
            agent.api("PUT", "/v1/agent/service/register",
                      {"ID": "web-1", "Name": "web", "Address": "10.100.1.11", "Port": 8080,
                       "Tags": ["v1", "blue"], "Weights": {"Passing": 3}})
            agent.register("web", "web-2", "10.100.1.12", 8080)
            agent.register("db", "db", "10.100.1.13", 5432)
            yield built, agent
        finally:
            agent.stop()


@pytest.mark.lab
def test_services_table_and_json(status_lab: tuple[labmod.Lab, LabAgent]) -> None:
    lab, _ = status_lab
    done = consulate(lab, "services")
    assert (done.returncode, done.stderr, done.stdout.splitlines()) == (0, "", [
        "SERVICE  ID     ADDRESS           TAGS",
        "db       db     10.100.1.13:5432",
        "web      web-1  10.100.1.11:8080  v1,blue",
        "web      web-2  10.100.1.12:8080",
    ])
    done = consulate(lab, "services", "--json")
    assert json.loads(done.stdout) == [
        {"service": "db", "id": "db", "address": "10.100.1.13", "port": 5432, "tags": []},
        {"service": "web", "id": "web-1", "address": "10.100.1.11", "port": 8080,
         "tags": ["v1", "blue"]},
        {"service": "web", "id": "web-2", "address": "10.100.1.12", "port": 8080, "tags": []},
    ]


@pytest.mark.lab
def test_routes_table_and_json(status_lab: tuple[labmod.Lab, LabAgent]) -> None:
    lab, _ = status_lab
    done = consulate(lab, "routes")
    assert (done.returncode, done.stderr, done.stdout.splitlines()) == (0, "", [
        "SERVICE  VIP              ENDPOINT  ADDRESS           NODE  WEIGHT",
        "db       244.211.181.161  db        10.100.1.13:5432  h1    1",
        "web      246.250.66.196   web-1     10.100.1.11:8080  h1    3",
        "                          web-2     10.100.1.12:8080  h1    1",
    ])
    done = consulate(lab, "routes", "--json")
    assert json.loads(done.stdout) == [
        {"service": "db", "vip": "244.211.181.161", "endpoints": [
            {"id": "db", "address": "10.100.1.13", "port": 5432, "node": "h1", "weight": 1,
             "tags": []}]},
        {"service": "web", "vip": "246.250.66.196", "endpoints": [
            {"id": "web-1", "address": "10.100.1.11", "port": 8080, "node": "h1",
             "weight": 3, "tags": ["v1", "blue"]},
            {"id": "web-2", "address": "10.100.1.12", "port": 8080, "node": "h1",
             "weight": 1, "tags": []}]},
    ]


@pytest.mark.lab
def test_status_table_and_json(status_lab: tuple[labmod.Lab, LabAgent]) -> None:
    lab, agent = status_lab
    version = agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["version"]
    done = consulate(lab, "status")
    assert (done.returncode, done.stderr) == (0, "")
    uptime = re.compile(r"up (\d+[dhms])+$")
    lines = done.stdout.splitlines()
    assert uptime.search(lines[0]), lines[0]
    assert [uptime.sub("up <uptime>", line) for line in lines] == [
        "Node     h1 (datacenter dc1, consulate 0.1.0), ready, up <uptime>",
        f"Routes   version {version}: 2 services, 3 endpoints",
        "Proxy    relay python, 0 connections to no VIP",
        "DNS      no replies yet",
        "Watches  0 blocking queries, 0 event streams",
        "",
        "SERVICE  VIP              ENDPOINTS  CONNECTIONS  ACTIVE  CONNECT FAILS  REJECTED  "
        "SENT  RECEIVED",
        "db       244.211.181.161          1            0       0              0         0  "
        " 0 B       0 B",
        "web      246.250.66.196           2            0       0              0         0  "
        " 0 B       0 B",
    ]
    view = json.loads(consulate(lab, "status", "--json").stdout)
    assert isinstance(view.pop("uptime_seconds"), float)
    counters = {"connections_total": 0, "connections_active": 0, "connect_failures": 0,
                "rejected": 0, "bytes_to_upstream": 0, "bytes_to_client": 0}
    assert view == {
        "node": "h1", "datacenter": "dc1", "version": "0.1.0", "ready": True,
        "relay": "python", "route_version": version,
        "services": [
            {"name": "db", "vip": "244.211.181.161", "endpoints": 1, **counters},
            {"name": "web", "vip": "246.250.66.196", "endpoints": 2, **counters},
        ],
        "unrouted": 0, "dns_responses": {},
        "watch": {"services": 0, "waiters": 0, "streams": 0},
    }


@pytest.mark.parametrize("command", ["status", "services", "routes"])
@pytest.mark.parametrize("as_json", [False, True])
def test_unreachable_agent_is_one_line_and_exit_1(command: str, as_json: bool,
                                                  tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "consulate.control.cli", command, "--http-addr", "127.0.0.1:1",
         *(["--json"] if as_json else [])], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (
        1, "", "consulate: error: no agent answers at http://127.0.0.1:1 ([Errno 111] "
               "Connection refused): start one with `consulate agent` or pass --http-addr\n")
