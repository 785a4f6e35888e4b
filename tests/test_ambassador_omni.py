"""Ambassador omni mode end to end: ``consulate agent --ambassador`` with a real dockerd
in a lab host. A Docker container connects to the bridge address (docker0) on a
port; iptables redirects it to the agent, which routes it by the container's
``BACKEND_<port>`` variable or ``connect.<port>`` label.

The clients run in the containers' own network namespaces (nsenter into the
container's PID): their source address is the container's, which is how the
agent finds them through the Docker API. The backends are netsvc echo servers in
lab containers. The ``consul://`` spec uses the agent's own Consul-compatible KV
API (no Consul server can run here).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import NETSVC, Peers
from procstop import stop_process
from test_ambassador_standalone import assert_reset, until

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent
from consulate.control.labdocker import LabDocker, busybox_image_tar

pytestmark = pytest.mark.lab

DOCKER0 = "172.17.0.1"  # dockerd's default bridge address, inside the lab host


@dataclass
class Omni:
    lab: labmod.Lab
    daemon: LabDocker
    agent: LabAgent
    peers: Peers

    def backend(self, j: int, port: int) -> str:
        return f"{self.lab.container_ip(1, j)}:{port}"

    def container(self, name: str, *, env: dict[str, str] | None = None,
                  labels: dict[str, str] | None = None) -> str:
        """Start a busybox container that sleeps; its IP address."""
        cid = self.daemon.run(name, ["sleep", "3600"], env=env, labels=labels)
        return str(self.daemon.api.inspect_container(cid)["NetworkSettings"]["IPAddress"])

    def connect(self, name: str, port: int, size: int = 1) -> dict[str, Any]:
        """netsvc's client in container ``name``'s network namespace, to docker0:port."""
        pid = self.daemon.api.inspect_container(name)["State"]["Pid"]
        done = subprocess.run(
            ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, NETSVC, "connect",
             "--host", DOCKER0, "--port", str(port), "--size", str(size), "--timeout", "10"],
            capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = self.agent.api("GET", "/v1/agent/self")["Stats"]["ambassador"]
        return stats

    def kv_put(self, key: str, value: str) -> None:
        """PUT the raw value into the agent's KV (/v1/kv, as Consul's)."""
        script = ("import sys,urllib.request as u\n"
                  "r=u.Request(sys.argv[1],data=sys.argv[2].encode(),method='PUT')\n"
                  "assert u.urlopen(r,timeout=5).read()==b'true'\n")
        self.lab.exec("h1", [sys.executable, "-c", script,
                             f"http://127.0.0.1:8500/v1/kv/{key}", value],
                      check=True, timeout=30)


@pytest.fixture(scope="module")
def omni(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Omni]:
    work = tmp_path_factory.mktemp("ambassador-omni")
    with labmod.up(hosts=1, containers=2) as lab:
        daemon = LabDocker(lab, 1, work / "dockerd").start()
        peers = Peers(lab)
        agent: LabAgent | None = None
        try:
            daemon.import_image(busybox_image_tar())
            peers.serve("h1c1", "s1", 7001)
            peers.serve("h1c2", "s2", 7002)
            agent = LabAgent(lab, 1, work / "data", work / "agent.log",
                             extra_args=["--docker-host", daemon.url, "--ambassador",
                                         "--connect-timeout", "1"]).start()
            yield Omni(lab, daemon, agent, peers)
        finally:
            if agent is not None:
                agent.stop()
            peers.stop_all()
            daemon.stop()


def test_the_agent_installs_the_omni_rule(omni: Omni) -> None:
    saved = omni.lab.exec("h1", ["iptables-save", "-t", "nat"], capture_output=True,
                          text=True, check=True, timeout=30).stdout
    assert (f"-A CONSULATE-PREROUTING -d {DOCKER0}/32 -p tcp -m multiport ! --dports "
            "53,8500,8600,10000,10001 -j REDIRECT --to-ports 10001") in saved


def test_backend_env_routes_to_a_static_address_byte_exact(omni: Omni) -> None:
    omni.container("app-env", env={"BACKEND_6379": omni.backend(1, 7001)})
    result = omni.connect("app-env", 6379, size=2 * 1024 * 1024)
    assert (result["ok"], result["id"], result["echo_ok"], result["trailer_ok"]) == (
        True, "s1", True, True), result


def test_connect_label_routes_to_a_registered_service(omni: Omni) -> None:
    omni.agent.register("web", "web-1", omni.lab.container_ip(1, 2), 7002)
    omni.container("app-label", labels={"connect.80": "web"},
                   env={"BACKEND_80": omni.backend(1, 7001)})  # the label wins
    result = omni.connect("app-label", 80, size=100_000)
    assert (result["ok"], result["id"]) == (True, "s2"), result
    omni.agent.api("PUT", "/v1/agent/service/deregister/web-1")
    refused = omni.connect("app-label", 80)
    assert_reset(refused)
    until(lambda: "reason=no-endpoints" in omni.agent.log())
    assert "container=app-label port=80 spec='web' reason=no-endpoints error=\"service 'web' " \
        "has no live instance\"" in omni.agent.log()


def test_a_kv_spec_switched_at_runtime_moves_new_connections(omni: Omni) -> None:
    omni.kv_put("ambassador/cache", omni.backend(1, 7001))
    omni.container("app-kv", env={"BACKEND_11211": "consul://127.0.0.1:8500/ambassador/cache"})
    assert omni.connect("app-kv", 11211, size=1000)["id"] == "s1"
    omni.kv_put("ambassador/cache", omni.backend(2, 7002))
    until(lambda: omni.connect("app-kv", 11211)["id"] == "s2")
    assert [omni.connect("app-kv", 11211, size=1000)["id"] for _ in range(2)] == ["s2", "s2"]


def test_no_backend_closes_and_logs_one_line(omni: Omni) -> None:
    ip = omni.container("app-none", env={"BACKEND_6379": omni.backend(1, 7001)})
    before = omni.stats()
    result = omni.connect("app-none", 5000, size=10)
    assert_reset(result)
    line = (f"event=no-backend caller={ip} container=app-none port=5000 spec='' reason=no-rule "
            "error='the container sets neither BACKEND_5000 nor the label connect.5000'")
    until(lambda: line in omni.agent.log())
    after = omni.stats()
    assert (after["connections_total"] - before["connections_total"],
            after["no_backend"] - before["no_backend"], after["connections_active"]) == (1, 1, 0)


def test_a_dead_callers_address_is_looked_up_again(omni: Omni) -> None:
    """Docker gives a removed container's address to the next one: the cached caller
    must go with the die event, or the new container would get the old one's routes."""
    first = omni.container("app-old", env={"BACKEND_6379": omni.backend(1, 7001)})
    assert omni.connect("app-old", 6379)["id"] == "s1"
    omni.daemon.api.remove_container("app-old", force=True)
    until(lambda: "event=caller-forgotten" in omni.agent.log())
    second = omni.container("app-new", env={"BACKEND_6379": omni.backend(2, 7002)})
    assert second == first  # the address was reused
    assert omni.connect("app-new", 6379)["id"] == "s2"



def test_standalone_ambassador_follows_a_service_in_the_agents_registry(omni: Omni,
                                                                         tmp_path: Path) -> None:
    """``consulate ambassador api`` next to the agent: the live instances of ``api``."""
    omni.agent.register("api", "api-1", omni.lab.container_ip(1, 1), 7001)
    log_path = tmp_path / "ambassador.log"
    with log_path.open("ab") as log:
        process = omni.lab.popen("h1", [sys.executable, "-m", "consulate.control.cli",
                                        "ambassador", "api", "--listen", "127.0.0.1:10100"],
                                 stdout=log, stderr=log)
    try:
        until(lambda: "event=listen component=ambassador" in log_path.read_text())

        def fetch() -> dict[str, Any]:
            [result] = omni.peers.run("h1", "connect", "--host", "127.0.0.1", "--port", "10100",
                                      "--size", "1000")
            return result

        assert (fetch()["ok"], fetch()["id"]) == (True, "s1")
        omni.agent.register("api", "api-2", omni.lab.container_ip(1, 2), 7002)
        omni.agent.api("PUT", "/v1/agent/service/deregister/api-1")
        until(lambda: fetch()["id"] == "s2")
        assert [fetch()["id"] for _ in range(2)] == ["s2", "s2"]
    finally:
        stop_process(process)
        omni.agent.api("PUT", "/v1/agent/service/deregister/api-2")


@pytest.mark.parametrize(("where", "args", "message"), [
    ("h1", ["--bridge-ip", "172.17.0"], "--bridge-ip '172.17.0' is not an IPv4 address"),
    ("h1c1", [], "no docker0 bridge with an IPv4 address here: start dockerd, or pass "
     "--bridge-ip"),
    ("h1", ["--docker-host", "unix:///nonexistent/docker.sock"],
     "--ambassador needs Docker: Docker at unix:///nonexistent/docker.sock is not answering"),
])
def test_ambassador_mode_refuses_to_start_without_its_parts(
        omni: Omni, tmp_path: Path, where: str, args: list[str], message: str) -> None:
    """Separate ports, no iptables: the module's agent keeps running beside it."""
    done = omni.lab.exec(where, [
        sys.executable, "-m", "consulate.control.cli", "agent", "--ambassador", "--no-iptables",
        "--no-registrator", "--data-dir", str(tmp_path), "--http-addr", "127.0.0.1:8501",
        "--dns-addr", "127.0.0.1:8601", "--proxy-addr", "127.0.0.1:10010",
        "--ambassador-addr", "0.0.0.0:10011", "--docker-host", omni.daemon.url, *args],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"consulate: error: {message}"), done.stderr
