"""The agent's life on a host: DNS from containers, restarts, rules removed on exit.

Each test runs its own agent in its own lab host, and checks the host's nat
table with iptables-save inside that namespace (never the root namespace's).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcdproc import EtcdProcess

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent

pytestmark = pytest.mark.lab


@pytest.fixture
def host_lab() -> Iterator[labmod.Lab]:
    with labmod.up(hosts=1, containers=1) as built:
        yield built


def _nat_rules(lab: labmod.Lab) -> str:
    return lab.exec("h1", ["iptables-save", "-t", "nat"], capture_output=True,
                    text=True, check=True).stdout


def _vip_route(lab: labmod.Lab) -> str:
    return lab.exec("h1", ["ip", "route", "show", "table", "local", "240.0.0.0/4"],
                    capture_output=True, text=True, check=True).stdout


def _dig(lab: labmod.Lab, *args: str) -> str:
    return lab.exec("h1c1", ["dig", "+tries=1", "+time=2", *args], capture_output=True,
                    text=True, check=True).stdout


def _agent(lab: labmod.Lab, work: Path) -> LabAgent:
    return LabAgent(lab, 1, work / "data", work / "agent.log")


def test_dns_answers_containers_on_the_bridge(host_lab: labmod.Lab, tmp_path: Path) -> None:
    agent = _agent(host_lab, tmp_path).start()
    try:
        agent.register("web", "web-1", host_lab.container_ip(1, 1), 80)
        vip = agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]["web"]["vip"]
        # The container's resolv.conf names the agent (bridge IP, port 53).
        assert _dig(host_lab, "+short", "web.service.consul").split() == [vip]
        assert _dig(host_lab, "+short", "WEB.Service.Consul").split() == [vip]
        nx = _dig(host_lab, "nosuch.service.consul")
        assert "status: NXDOMAIN" in nx
        assert "consul.\t\t\t0\tIN\tSOA\tns.consul. hostmaster.consul." in nx
    finally:
        agent.stop()


def test_restart_keeps_vips_and_stop_leaves_no_rules(
    host_lab: labmod.Lab, tmp_path: Path
) -> None:
    assert "CONSULATE" not in _nat_rules(host_lab)
    agent = _agent(host_lab, tmp_path).start()
    agent.register("web", "web-1", host_lab.container_ip(1, 1), 80)
    agent.register("db", "db-1", host_lab.container_ip(1, 1), 5432)
    before = agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]
    rules = _nat_rules(host_lab)
    assert ":CONSULATE-PREROUTING - [0:0]" in rules
    # TCP is steered by BPF sk_lookup (the default where the kernel has it): nat has UDP only
    assert "-A CONSULATE-PREROUTING -d 240.0.0.0/4 -p udp -j CONSULATE-UDP" in rules
    assert "-p tcp" not in rules
    assert "local 240.0.0.0/4 dev lo" in _vip_route(host_lab)

    assert agent.stop() == 0
    assert "CONSULATE" not in _nat_rules(host_lab)
    assert _vip_route(host_lab) == ""
    assert "event=iptables-removed" in agent.log()

    restarted = _agent(host_lab, tmp_path).start()
    try:
        after = restarted.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]
        assert after == before  # same services, same VIPs, same endpoints
        catalog = restarted.api("GET", "/v1/catalog/service/web")
        assert [(e["ServiceID"], e["ServicePort"]) for e in catalog] == [("web-1", 80)]
    finally:
        restarted.stop()


def test_cleanup_removes_what_a_killed_agent_left(host_lab: labmod.Lab, tmp_path: Path) -> None:
    agent = _agent(host_lab, tmp_path).start()
    assert agent.process is not None
    os.kill(agent.process.pid, signal.SIGKILL)  # no chance to clean up
    agent.stop()
    assert "CONSULATE-OUTPUT" in _nat_rules(host_lab)
    done = host_lab.exec("h1", [sys.executable, "-m", "consulate.control.cli", "agent",
                                "--cleanup"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "removed consulate's iptables rules and VIP route"
    assert "CONSULATE" not in _nat_rules(host_lab)
    assert _vip_route(host_lab) == ""
    again = host_lab.exec("h1", [sys.executable, "-m", "consulate.control.cli", "agent",
                                 "--cleanup"], capture_output=True, text=True)
    assert again.stdout.strip() == "nothing to clean up"


def test_agent_without_cap_net_admin_says_what_to_do(
    host_lab: labmod.Lab, tmp_path: Path
) -> None:
    data = Path(tempfile.mkdtemp(prefix="consulate-nobody-"))
    shutil.chown(data, "nobody")
    done = host_lab.exec(
        "h1",
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-m", "consulate.control.cli", "agent", "--data-dir", str(data),
         "--proxy-addr", "127.0.0.1:10000", "--http-addr", "127.0.0.1:18500",
         "--dns-addr", "127.0.0.1:18600"],
        capture_output=True, text=True, timeout=30,
    )
    shutil.rmtree(data)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("consulate: error: ")
    assert "CAP_NET_ADMIN" in last and "run it as root" in last


def test_agent_without_iptables_says_what_to_install(
    host_lab: labmod.Lab, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink("/usr/sbin/ip", bin_dir / "ip")  # iproute2 present, iptables missing
    done = host_lab.exec(
        "h1",
        [sys.executable, "-m", "consulate.control.cli", "agent",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PATH": str(bin_dir)},
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("consulate: error: iptables-save not found: install iptables "
                    "(apt-get install iptables) or run the agent with --no-iptables")
    assert _vip_route(host_lab) == ""  # what it had set up was rolled back


def test_watchers_whose_clients_leave_are_released(host_lab: labmod.Lab, tmp_path: Path) -> None:
    agent = _agent(host_lab, tmp_path).start()
    script = (
        "import socket, time\n"
        "socks = []\n"
        "for _ in range(20):\n"
        "    s = socket.create_connection(('127.0.0.1', 8500))\n"
        "    s.sendall(b'GET /v1/discover/services/web/instances?index=999999&wait=5m '\n"
        "              b'HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
        "    socks.append(s)\n"
        "time.sleep(1)\n"  # the agent holds them all, then the process exits
    )
    try:
        waiting = subprocess.Popen(["ip", "netns", "exec", host_lab.host_ns(1),
                                    sys.executable, "-c", script])
        deadline = time.monotonic() + 5
        while agent.api("GET", "/v1/agent/self")["Stats"]["watch"]["waiters"] < 20:
            assert time.monotonic() < deadline, "the long polls never arrived"
            time.sleep(0.05)
        waiting.wait(10)
        deadline = time.monotonic() + 3
        while agent.api("GET", "/v1/agent/self")["Stats"]["watch"]["waiters"]:
            assert time.monotonic() < deadline, "left long polls still held"
            time.sleep(0.05)
    finally:
        agent.stop()


def test_an_agent_started_before_its_registry_becomes_ready_when_it_answers(
        host_lab: labmod.Lab, tmp_path: Path) -> None:
    """The registry (etcd, in the host) is down when the agent starts: the agent
    serves, says it is not ready and why, and programs the routes once etcd is up."""
    address = host_lab.host_ip(1)
    agent = LabAgent(host_lab, 1, tmp_path / "data", tmp_path / "agent.log",
                     extra_args=["--registry", f"etcd://{address}:2379"]).start(ready=False)
    etcd = EtcdProcess(tmp_path / "etcd", address, "h1",
                       prefix=["ip", "netns", "exec", host_lab.host_ns(1)])
    try:
        with pytest.raises(OSError, match="HTTP Error 503"):
            agent.api("GET", "/v1/agent/ready")
        assert agent.api("GET", "/v1/agent/self")["Stats"]["agent"]["ready"] is False
        etcd.launch()
        etcd.wait_healthy()
        deadline = time.monotonic() + 30
        while not agent.api("GET", "/v1/agent/self")["Stats"]["agent"]["ready"]:
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
        assert agent.api("GET", "/v1/agent/ready") == {"Ready": True}
        components = agent.api("GET", "/v1/agent/self")["Stats"]["components"]
        assert {name: c["State"] for name, c in components.items()} == {
            "routes": "running", "watch-hub": "running"}
        agent.register("web", "web-1", host_lab.container_ip(1, 1), 80)
        while "web" not in agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]:
            assert time.monotonic() < deadline + 10, agent.log()
            time.sleep(0.1)
    finally:
        agent.stop()
        etcd.stop()
    assert "event=not-ready reason='no answer from the registry" in agent.log()
