"""Configurator end to end in a lab: real nginx and real HAProxy in a host
namespace, real backends in container namespaces, a real consulate agent as the
registry, and ``consulate configurator`` as a process.

- the nginx-appliance walk-through: upstreams added over REST, traffic through
  nginx from a container (wget), an invalid change refused with nginx's words;
- HAProxy backends following a registry service as instances come and go, the
  last good file kept when the service has no instance left;
- roll-back: a change HAProxy accepts with ``-c`` but cannot load (its new bind
  address is taken), so the reload fails, the last good file comes back and
  HAProxy keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from consulate.control import lab as labmod
from consulate.control.configurator import nginx_conf
from consulate.control.configurator.stores import pretty
from consulate.control.labagent import LabAgent

pytestmark = pytest.mark.lab

API = "http://127.0.0.1:9000"
WAIT = 30.0  # seconds for a condition on busy machines
_REQUEST = (
    "import sys,urllib.request as u,urllib.error as e\n"
    "d=sys.stdin.buffer.read() or None\n"
    "r=u.Request(sys.argv[1],data=d,method=sys.argv[2])\n"
    "try:\n"
    "    f=u.urlopen(r,timeout=20); s=f.status; b=f.read()\n"
    "except e.HTTPError as x:\n"
    "    s=x.code; b=x.read()\n"
    "sys.stdout.write(str(s)+'\\n'); sys.stdout.buffer.write(b)\n"
)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


class Site:
    """The lab and the processes a test starts in it, stopped by PID."""

    def __init__(self, lab: labmod.Lab, work: Path) -> None:
        self.lab = lab
        self.work = work
        self.processes: list[subprocess.Popen[bytes]] = []
        self.pidfiles: list[Path] = []

    def start(self, where: str, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.work / log, "ab") as out:
            process = self.lab.popen(where, argv, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def backend(self, j: int) -> str:
        """An HTTP server in container h1c<j> answering ``backend-<j>``; its address."""
        root = self.work / f"www{j}"
        root.mkdir()
        (root / "index.html").write_text(f"backend-{j}\n")
        address = self.lab.container_ip(1, j)
        self.start(f"h1c{j}", [sys.executable, "-m", "http.server", "8000", "--bind", address,
                               "--directory", str(root)], f"www{j}.log")
        return address

    def get(self, where: str, url: str) -> str:
        done = self.lab.exec(where, ["wget", "-qO-", "-T", "5", url], capture_output=True,
                             timeout=30)
        return done.stdout.decode() if done.returncode == 0 else f"error {done.returncode}"

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, str]:
        done = self.lab.exec("h1", [sys.executable, "-c", _REQUEST, API + path, method],
                             input=b"" if body is None else json.dumps(body).encode(),
                             capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        status, _, text = done.stdout.decode().partition("\n")
        return int(status), text

    def configurator(self, *args: str) -> None:
        self.start("h1", [sys.executable, "-m", "consulate.control.cli", "configurator",
                          *args], "configurator.log")
        wait_until(lambda: self.api_up(), "the configurator API answers")

    def api_up(self) -> bool:
        if self.processes[-1].poll() is not None:
            raise AssertionError(f"configurator exited: {self.log('configurator.log')}")
        done = self.lab.exec("h1", ["wget", "-qO/dev/null", "-T", "2", API + "/v1/config"],
                             timeout=30)
        return done.returncode == 0

    def log(self, name: str) -> str:
        path = self.work / name
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        for pidfile in self.pidfiles:  # daemons the reload command started
            for pid in pidfile.read_text().split() if pidfile.exists() else ():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGTERM)


@pytest.fixture(scope="module")
def lab() -> Iterator[labmod.Lab]:
    with labmod.up(hosts=1, containers=4) as built:
        yield built


@pytest.fixture
def site(lab: labmod.Lab, tmp_path: Path) -> Iterator[Site]:
    running = Site(lab, tmp_path)
    try:
        yield running
    finally:
        running.stop()


def test_nginx_appliance_walkthrough(site: Site) -> None:
    work, front = site.work, site.lab.bridge_ip(1)
    one, two = site.backend(1), site.backend(2)
    document: dict[str, Any] = {
        "pid": str(work / "nginx.pid"), "error_log": str(work / "error.log"),
        "events": {}, "http": {"access_log": "off", "server": {
            "listen": f"{front}:8080", "location /": {"return": "200 'no upstream yet\\n'"}}}}
    (work / "doc.json").write_bytes(pretty(document))
    target = work / "nginx.conf"
    target.write_text(nginx_conf.render(document))  # the nginx already running there
    site.start("h1", ["nginx", "-p", str(work), "-c", str(target), "-g", "daemon off;"],
               "nginx.out")
    client = "h1c4"
    wait_until(lambda: site.get(client, f"http://{front}:8080/") == "no upstream yet\n",
               "nginx answers")

    site.configurator(f"file://{work}/doc.json", "nginx-conf", str(target),
                      "-c", f"nginx -t -q -p {work} -c {{{{.src}}}}",
                      "-r", f"nginx -p {work} -c {target} -s reload")
    assert site.api("PUT", "/v1/config/http/upstream%20app", {"server": [f"{one}:8000"]}) == (
        200, '{\n  "server": [\n    "' + one + ':8000"\n  ]\n}\n')
    status, _ = site.api("PUT", "/v1/config/http/server/location%20%2F",
                         {"proxy_pass": "http://app"})
    assert status == 200
    wait_until(lambda: site.get(client, f"http://{front}:8080/") == "backend-1\n",
               "nginx proxies to backend 1")

    status, body = site.api("POST", "/v1/config/http/upstream%20app/server", f"{two}:8000")
    assert (status, json.loads(body)) == (200, [f"{one}:8000", f"{two}:8000"])
    seen: set[str] = set()
    wait_until(lambda: seen.add(site.get(client, f"http://{front}:8080/")) or
               seen >= {"backend-1\n", "backend-2\n"}, "nginx balances over both")

    stored, rendered = (work / "doc.json").read_bytes(), target.read_bytes()
    status, body = site.api("PUT", "/v1/config/http/server/location%20%2F/proxy_pass",
                            "http://nowhere")
    assert status == 400
    assert 'host not found in upstream "nowhere"' in body and "test failed" in body
    assert (work / "doc.json").read_bytes() == stored and target.read_bytes() == rendered
    assert site.get(client, f"http://{front}:8080/") in ("backend-1\n", "backend-2\n")
    expected = json.loads(stored)
    assert expected["http"]["upstream app"] == {"server": [f"{one}:8000", f"{two}:8000"]}
    assert rendered.decode() == nginx_conf.render(expected)


def _haproxy_reload(work: Path, config: Path) -> str:
    """Start HAProxy, or replace it (-sf) with one loading the new file: exits non-zero
    when the new process cannot start (a bind fails), the old one keeps serving."""
    pid = work / "haproxy.pid"
    return (f"haproxy -f {config} -p {pid} -D $(test -s {pid} && echo -sf $(cat {pid}))")


def _servers(config: Path) -> list[str]:
    return [line.strip() for line in config.read_text().splitlines()
            if line.strip().startswith("server ")]


def test_haproxy_follows_the_registry_and_rolls_back(site: Site, lab: labmod.Lab) -> None:
    work, front = site.work, lab.bridge_ip(1)
    agent = LabAgent(lab, 1, work / "agent", work / "agent.log",
                     extra_args=["--no-iptables", "--no-registrator"]).start()
    try:
        _haproxy_case(site, agent, work, front)
    finally:
        agent.stop()


def _haproxy_case(site: Site, agent: LabAgent, work: Path, front: str) -> None:
    addresses = {j: site.backend(j) for j in (1, 2, 3)}
    agent.register("web", "web-1", addresses[1], 8000)
    document = {
        "global": {"maxconn": 64},
        "defaults": {"mode": "http", "timeout": {"connect": "2s", "client": "10s",
                                                 "server": "10s"}},
        "frontend www": {"bind": f"{front}:8080", "default_backend": "web"},
        "backend web": {"balance": "roundrobin", "server": {
            "$services": "web", "format": "{id} {address}:{port}"}}}
    (work / "doc.json").write_bytes(pretty(document))
    config = work / "haproxy.cfg"
    site.pidfiles.append(work / "haproxy.pid")
    site.configurator(f"file://{work}/doc.json", "haproxy-cfg", str(config),
                      "-r", _haproxy_reload(work, config), "--registry",
                      "consul://127.0.0.1:8500", "-v")
    url = f"http://{front}:8080/"
    assert _servers(config) == [f"server web-1 {addresses[1]}:8000"]
    wait_until(lambda: site.get("h1", url) == "backend-1\n", "haproxy serves backend 1")

    agent.register("web", "web-2", addresses[2], 8000)
    both = [f"server web-1 {addresses[1]}:8000", f"server web-2 {addresses[2]}:8000"]
    wait_until(lambda: _servers(config) == both, "web-2 added to the backend")
    seen: set[str] = set()
    wait_until(lambda: seen.add(site.get("h1", url)) or seen >= {"backend-1\n", "backend-2\n"},
               "haproxy balances over both")

    agent.api("PUT", "/v1/agent/service/deregister/web-1")
    wait_until(lambda: _servers(config) == [f"server web-2 {addresses[2]}:8000"],
               "web-1 removed from the backend")

    last_good = config.read_bytes()
    agent.api("PUT", "/v1/agent/service/deregister/web-2")
    wait_until(lambda: "event=render-skipped" in site.log("configurator.log"),
               "the empty service is noticed")
    assert config.read_bytes() == last_good  # never rendered empty
    agent.register("web", "web-3", addresses[3], 8000)
    wait_until(lambda: _servers(config) == [f"server web-3 {addresses[3]}:8000"],
               "web-3 becomes the backend")
    wait_until(lambda: site.get("h1", url) == "backend-3\n", "haproxy serves backend 3")

    # Roll-back: port 8081 is taken, so HAProxy's check passes and its reload fails.
    site.start("h1", [sys.executable, "-c", "import socket,time;s=socket.create_server(("
                      f"'{front}',8081));print('up',flush=True);time.sleep(3600)"], "taken.log")
    wait_until(lambda: "up" in site.log("taken.log"), "port 8081 is taken")
    before = config.read_bytes()
    status, body = site.api("PUT", "/v1/config/frontend%20www/bind", f"{front}:8081")
    assert status == 500
    assert body.startswith("committed, but the reload command failed: ")
    assert "cannot bind socket" in body
    assert body.endswith("; restored the last good file of 1 target(s) and reloaded again "
                         "(ok)\n")
    assert config.read_bytes() == before
    assert site.get("h1", url) == "backend-3\n"
    assert (work / "haproxy.cfg.bak").read_bytes() == before


def test_configurator_inside_the_agent(site: Site, lab: labmod.Lab) -> None:
    """``consulate agent --configurator ARGS``: the agent's own registry feeds
    ``$services`` and the configurator's API answers beside the agent's."""
    work = site.work
    (work / "doc.json").write_bytes(pretty({"upstream": {
        "$services": "api", "format": "{address}:{port}", "allow_empty": True}}))
    target = work / "upstreams.toml"
    agent = LabAgent(lab, 1, work / "agent", work / "agent.log", extra_args=[
        "--no-iptables", "--no-registrator", "--configurator",
        f"file://{work}/doc.json toml {target} -p 9000 -r 'echo reload >> {work}/reloads'"],
    ).start()
    try:
        assert target.read_text() == "upstream = []\n"
        agent.register("api", "api-2", "10.0.0.2", 7000)
        agent.register("api", "api-1", "10.0.0.1", 7000)
        wait_until(lambda: target.read_text() ==
                   'upstream = ["10.0.0.1:7000", "10.0.0.2:7000"]\n', "both instances")
        status, body = site.api("GET", "/v1/render")
        assert (status, body) == (200, target.read_text())
    finally:
        assert agent.stop() == 0
