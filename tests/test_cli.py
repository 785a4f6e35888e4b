"""The client commands against a real agent in a lab host, and their error lines."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def cli_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[labmod.Lab, LabAgent]]:
    work = tmp_path_factory.mktemp("cli")
    with labmod.up(hosts=1, containers=1) as built:
        agent = LabAgent(built, 1, work / "data", work / "agent.log").start()
        try:
            yield built, agent
        finally:
            agent.stop()


def consulate(lab: labmod.Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.exec("h1", [sys.executable, "-m", "consulate.control.cli", *args],
                    capture_output=True, text=True, timeout=30)


def test_register_list_deregister(cli_lab: tuple[labmod.Lab, LabAgent]) -> None:
    lab, agent = cli_lab
    done = consulate(lab, "register", "web", "10.100.1.11:8080", "--id", "web-1",
                     "--tag", "v1", "--tag", "blue", "--meta", "version=1.2", "--weight", "3")
    assert (done.returncode, done.stdout) == (0, "registered web-1 (web at 10.100.1.11:8080)\n")
    assert consulate(lab, "register", "db", "10.100.1.12:5432", "--ttl", "30s").returncode == 0
    listed = consulate(lab, "services")
    assert listed.stdout.splitlines() == [
        "SERVICE  ID     ADDRESS           TAGS",
        "db       db     10.100.1.12:5432",
        "web      web-1  10.100.1.11:8080  v1,blue",
    ]
    [entry] = agent.api("GET", "/v1/catalog/service/web")
    assert entry["ServiceMeta"] == {"version": "1.2"}
    assert entry["ServiceWeights"] == {"Passing": 3, "Warning": 1}
    done = consulate(lab, "deregister", "web-1")
    assert (done.returncode, done.stdout) == (0, "deregistered web-1\n")
    assert agent.api("GET", "/v1/catalog/services") == {"db": []}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("deregister", "nope"),
         "consulate: error: PUT /v1/agent/service/deregister/nope: 404 Unknown service ID "
         "'nope': list registered ids with GET /v1/catalog/service/<name> or "
         "`consulate services`"),
        (("register", "web", "10.0.0.1"),
         "consulate: error: address '10.0.0.1' is not ADDR:PORT (for example 10.0.0.5:80)"),
        (("register", "web", "10.0.0.1:0"),
         "consulate: error: PUT /v1/agent/service/register: 400 Port 0 is invalid: "
         "give a number from 1 to 65535"),
        (("register", "web", "10.0.0.1:80", "--meta", "novalue"),
         "consulate: error: --meta 'novalue' is not KEY=VALUE"),
        (("register", "web", "10.0.0.1:80", "--ttl", "ten"),
         "consulate: error: --ttl: duration 'ten' is not a string like '10s' or '1m30s'"),
        (("services", "--http-addr", "127.0.0.1:1"),
         "consulate: error: no agent answers at http://127.0.0.1:1 ([Errno 111] Connection "
         "refused): start one with `consulate agent` or pass --http-addr"),
        (("agent", "--http-addr", "localhost"),
         "consulate: error: --http-addr 'localhost' is not HOST:PORT (for example "
         "127.0.0.1:8500)"),
        (("agent", "--mark", "0"),
         "consulate: error: --mark '0' must be a number from 1 to 0xffffffff"),
    ],
)
def test_errors_are_one_line_with_what_to_do(
    cli_lab: tuple[labmod.Lab, LabAgent], args: tuple[str, ...], message: str
) -> None:
    lab, agent = cli_lab
    before = agent.api("GET", "/v1/catalog/services")
    done = consulate(lab, *args)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", message + "\n")
    assert agent.api("GET", "/v1/catalog/services") == before


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "consulate.control.cli", "register"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "the following arguments are required: name, ADDR:PORT" in done.stderr
