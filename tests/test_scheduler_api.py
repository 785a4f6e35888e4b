"""The scheduler over HTTP (/v1/jobs...) and through `consulate job|alloc`, against a
real aiohttp server on 127.0.0.1 holding a Scheduler with three nodes."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession, web

from consulate.control.registry import EmbeddedRegistry
from consulate.control.scheduler import api
from consulate.control.scheduler.host import SchedulerHost
from consulate.control.scheduler.nodes import Node
from consulate.control.scheduler.service import Scheduler

WEB = {"name": "web", "strategy": "spread",
       "groups": [{"name": "web", "count": 4, "driver": "exec",
                   "config": {"command": "sleep", "args": ["1000"]},
                   "resources": {"cpu": 100, "memory": 64}, "env": {"SERVICE_NAME": "web"}}]}
WEB_TOML = """\
name = "web"
strategy = "spread"

[[groups]]
name = "web"
count = 4
driver = "exec"
config = { command = "sleep", args = ["1000"] }
resources = { cpu = 100, memory = 64 }
env = { SERVICE_NAME = "web" }
"""


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, Scheduler, EmbeddedRegistry]]:
    """The agent's scheduler routes over a real embedded registry (jobs persist in its
    KV); three nodes are given to the Scheduler directly, no agent runs them."""
    registry = EmbeddedRegistry(tmp_path / "registry.db")
    registry.start()
    host = SchedulerHost(registry, node="h0", advertise="127.0.0.1", datacenter="dc1",
                         data_dir=tmp_path, docker=f"unix://{tmp_path}/no-docker.sock")
    for name in ("h1", "h2", "h3"):
        host.scheduler.node_up(Node(name, 1000, 1000, attributes={"kernel.name": "linux"}))
    app = web.Application()
    api.add_routes(app, host)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"127.0.0.1:{port}", host.scheduler, registry
    await runner.cleanup()
    await host.close()
    await registry.close()


async def consulate(address: str, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consulate.control.cli", *args, "--http-addr", address,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_http_json_and_toml(server: tuple[str, Scheduler, EmbeddedRegistry]) -> None:
    address, scheduler, registry = server
    async with ClientSession(f"http://{address}") as http:
        response = await http.put("/v1/jobs", data=json.dumps(WEB))
        body = await response.json()
        assert response.status == 200
        assert sorted(p["node"] for p in body["placed"]) == ["h1", "h1", "h2", "h3"]
        assert (body["unplaced"], body["placement_failures"]) == ({}, {})
        stored = await registry.kv_get("consulate/scheduler/jobs/web")
        assert stored is not None and json.loads(stored.value) == WEB
        # the same job again as TOML: nothing to change
        response = await http.post("/v1/jobs", data=WEB_TOML,
                                   headers={"Content-Type": "application/toml"})
        assert (await response.json())["placed"] == []
        response = await http.put("/v1/jobs", data=json.dumps({**WEB, "count": 4}))
        assert response.status == 400
        assert await response.text() == (
            "invalid job file: count: unknown field (known fields: name, type, strategy, "
            "constraints, colocate_with, conflicts_with, rebalance, restart, reschedule, "
            "groups)")
        assert len(scheduler.allocations) == 4  # the refused file changed nothing
        listed = await (await http.get("/v1/jobs")).json()
        assert listed == [{"name": "web", "type": "service", "status": "running"}]
        response = await http.get("/v1/job/nope")
        assert (response.status, await response.text()) == (
            404, 'No job(s) with prefix or id "nope" found: list them with GET /v1/jobs')
        some = next(iter(scheduler.allocations))
        explained = await (await http.get(f"/v1/allocation/{some[:6]}/explain")).json()
        assert explained["id"] == some and explained["nodes_evaluated"] == 3
        nodes = await (await http.get("/v1/nodes")).json()
        assert [(n["name"], n["allocations"], n["cpu_used"]) for n in nodes] == [
            ("h1", 2, 200), ("h2", 1, 100), ("h3", 1, 100)]


async def test_cli_run_status_explain_stop(server: tuple[str, Scheduler, EmbeddedRegistry],
                                           tmp_path: Path) -> None:
    address, scheduler, registry = server
    job_file = tmp_path / "web.toml"
    job_file.write_text(WEB_TOML)
    code, out, _ = await consulate(address, "job", "run", str(job_file))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == '==> Job "web" submitted'
    assert sorted(line.split('node "')[1].split('"')[0] for line in lines[1:]) == [
        "h1", "h1", "h2", "h3"]

    code, out, _ = await consulate(address, "job", "status")
    assert (code, out) == (0, "ID   Type     Status\nweb  service  running\n")
    code, out, _ = await consulate(address, "job", "status", "web")
    assert code == 0
    head, allocations = out.split("\nAllocations\n")
    assert head.splitlines()[3:] == [
        "Type          = service", "Strategy      = spread", "Status        = running", "",
        "Summary",
        "Task Group  Queued  Starting  Running  Failed  Complete  Lost",
        "web         0       4         0        0       0         0"]
    rows = allocations.splitlines()
    assert rows[0].split() == ["ID", "Node", "ID", "Task", "Group", "Desired", "Status",
                               "Created"]
    assert sorted(r.split()[1] for r in rows[1:]) == ["h1", "h1", "h2", "h3"]

    first = scheduler.job_allocations("web")[0]
    code, out, _ = await consulate(address, "alloc", "explain", first.id[:8])
    assert code == 0
    assert out.splitlines()[:7] == [
        f"ID          = {first.id}", "Name        = web.web[0]", "Job         = web",
        "Group       = web", "Strategy    = spread", "Placed on   = h1",
        "Nodes       = 3 evaluated, 3 feasible"]

    code, out, _ = await consulate(address, "alloc", "status", first.id[:8])
    assert code == 0
    assert out.splitlines()[:10] == [
        f"ID            = {first.id}", "Name          = web.web[0]", "Node ID       = h1",
        "Job ID        = web", "Desired       = run", "Client Status = pending",
        "Restarts      = 0", "Ports         = -", "", "Recent Events:"]
    assert out.splitlines()[10].split() == ["Time", "Status", "Description"]
    assert out.splitlines()[11].split()[1:] == ["pending", "placed", "on", "h1"]

    code, out, _ = await consulate(address, "job", "stop", "web")
    assert (code, out.splitlines()[0]) == (0, '==> Job "web" stopped')
    assert {a.desired for a in scheduler.allocations.values()} == {"stop"}
    assert await registry.kv_get("consulate/scheduler/jobs/web") is None


async def test_cli_errors_and_placement_failure(
        server: tuple[str, Scheduler, EmbeddedRegistry], tmp_path: Path) -> None:
    address, scheduler, _ = server
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**WEB, "groups": [{**WEB["groups"][0], "count": -1}]}))
    code, out, _ = await consulate(address, "job", "run", str(bad))
    assert (code, out) == (1, f"Error parsing job file {bad}: groups[0].count: -1 is out "
                              "of range: use 0 to 100000\n")
    assert scheduler.jobs == {}

    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({**WEB, "groups": [{**WEB["groups"][0],
                                                   "resources": {"memory": 5000}}]}))
    code, out, _ = await consulate(address, "job", "run", str(huge))
    assert code == 2
    assert out == ('==> Job "web" submitted\n==> Placement Failure\n'
                   '    Task Group "web" (4 unplaced):\n'
                   "      * memory exhausted: needs 5000 MB free: 3 nodes\n")
    code, out, _ = await consulate(address, "job", "status", "web")
    assert "Status        = pending" in out
    assert ('Placement Failure\nTask Group "web":\n'
            "  * memory exhausted: needs 5000 MB free: 3 nodes\n") in out

    code, _, err = await consulate(address, "job", "status", "nope")
    assert (code, err) == (1, "consulate: error: GET /v1/job/nope: 404 No job(s) with prefix "
                              'or id "nope" found: list them with GET /v1/jobs\n')
    code, _, err = await consulate(address, "alloc", "explain", "zzzz")
    assert code == 1
    assert err.endswith('404 No allocation(s) with prefix or id "zzzz" found\n')
