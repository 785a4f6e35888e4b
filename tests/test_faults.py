"""Fault injection in the lab: the registry backend, dockerd, an agent and a host's
link fail while traffic flows, and the mesh does what it should.

A 3-host lab: agents on h1 and h2, one etcd member on h3 (the registry of both),
echo servers in containers (tests/netsvc.py: a connection is ok when its payload
came back byte for byte). dockerd gets a 1-host lab of its own, so that its
chains and rules never mix with the mesh's. Loss and delay are made with
netfilter in the host's namespace (tests/linkfault.py): this kernel has no netem.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Peers
from linkfault import LinkFault
from multihost import endpoints, until

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent
from consulate.control.labdocker import LabDocker, busybox_image_tar
from consulate.control.labetcd import EtcdProcess

pytestmark = pytest.mark.lab

CONNECT_TIMEOUT = 1.0
BASE_EJECTION = 5.0
LIVENESS_TTL = 3.0
AGENT_ARGS = ["--connect-timeout", str(CONNECT_TIMEOUT), "--base-ejection-time",
              str(BASE_EJECTION), "--liveness-ttl", f"{LIVENESS_TTL}s"]


@dataclass
class Mesh:
    lab: labmod.Lab
    etcd: EtcdProcess
    etcd_data: Path  # its data directory: removed to make it come back empty
    agents: dict[int, LabAgent]  # by host: h1 and h2
    peers: Peers


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("faults")
    with labmod.up(hosts=3, containers=2) as lab:
        etcd = EtcdProcess(work / "etcd", lab.host_ip(3), "h3",
                           prefix=["ip", "netns", "exec", lab.host_ns(3)]).start()
        agents: dict[int, LabAgent] = {}
        peers = Peers(lab)
        try:
            for i in (1, 2):
                agents[i] = LabAgent(lab, i, work / f"agent-h{i}", work / f"h{i}.log",
                                     extra_args=["--registry", f"etcd://{lab.host_ip(3)}:2379",
                                                 *AGENT_ARGS]).start()
            yield Mesh(lab, etcd, work / "etcd" / "data", agents, peers)
        finally:
            peers.stop_all()
            for agent in agents.values():
                agent.stop()
            etcd.stop()
        for i in (1, 2):  # every agent took its rules with it
            assert "CONSULATE" not in iptables_save(lab, i)


def call(agent: LabAgent, method: str, path: str, body: object = None) -> tuple[int, str]:
    """An API call from inside the agent's host: (status, body), errors included."""
    script = (
        "import sys,urllib.request as u,urllib.error as e\n"
        "d=sys.stdin.buffer.read() or None\n"
        "r=u.Request(sys.argv[1],data=d,method=sys.argv[2])\n"
        "try:\n"
        "    with u.urlopen(r,timeout=10) as a: s,t=a.status,a.read()\n"
        "except e.HTTPError as x: s,t=x.code,x.read()\n"
        "sys.stdout.buffer.write(str(s).encode()+b' '+t)\n"
    )
    done = agent.lab.exec(agent.where, [sys.executable, "-c", script,
                                        f"http://127.0.0.1:8500{path}", method],
                          input=json.dumps(body).encode() if body is not None else b"",
                          capture_output=True, timeout=30, check=True)
    status, _, text = done.stdout.decode().partition(" ")
    return int(status), text


def iptables_save(lab: labmod.Lab, host: int) -> str:
    """The host's rules, without the comment lines and counters that change by themselves."""
    saved = lab.exec(f"h{host}", ["iptables-save"], capture_output=True, text=True,
                     check=True).stdout
    return "".join(re.sub(r" \[\d+:\d+\]$", "", line) + "\n"
                   for line in saved.splitlines() if not line.startswith("#"))


def ok_ids(results: list[dict[str, Any]]) -> list[str]:
    """The instance each connection reached; every one must have echoed byte for byte."""
    assert [r["ok"] for r in results] == [True] * len(results), results
    return [r["id"] for r in results]


def catalog(agent: LabAgent, service: str) -> list[tuple[str, str, int, int]]:
    return [(e["ServiceID"], e["ServiceAddress"], e["ServicePort"], e["CreateIndex"])
            for e in agent.api("GET", f"/v1/catalog/service/{service}")]


def heartbeats(agent: LabAgent) -> dict[str, Any]:
    return dict(agent.api("GET", "/v1/agent/self")["Stats"]["heartbeats"])


# -- 1. the registry backend stops and comes back ------------------------------------


def test_etcd_outage_keeps_the_routes_and_loses_nothing(mesh: Mesh) -> None:
    """etcd stopped: connections by name keep going to the last known endpoints, the
    agent stays ready (its routes are programmed) and its status says the heartbeats
    fail, a registration is kept by the agent (as a Consul agent keeps its local state
    while no server answers); etcd back: every instance is still there, the same
    registrations (etcd keeps leases across a restart), the one made during the outage
    is registered, and the routes follow it."""
    lab, agents, peers = mesh.lab, mesh.agents, mesh.peers
    port = 7301
    for i in (1, 2):
        peers.serve(f"h{i}c1", f"outage-h{i}", port)
        agents[i].register("outage", f"outage-h{i}", lab.container_ip(i, 1), port)
    for i in (1, 2):
        until(lambda i=i: endpoints(agents[i], "outage") == 2)
    before = catalog(agents[1], "outage")
    assert [entry[:3] for entry in before] == [
        ("outage-h1", lab.container_ip(1, 1), port), ("outage-h2", lab.container_ip(2, 1), port)]
    logged = {i: len(agents[i].log()) for i in (1, 2)}
    late = {"ID": "outage-late", "Name": "outage", "Address": lab.container_ip(1, 2),
            "Port": port}
    unreachable = f"etcd at {lab.host_ip(3)}:2379 is not answering ("

    mesh.etcd.stop()
    try:
        for i in (1, 2):
            until(lambda i=i: heartbeats(agents[i])["failing"], 15)
            assert heartbeats(agents[i])["error"].startswith(unreachable)
            # Routes are programmed (the last known ones): the agent still serves.
            assert call(agents[i], "GET", "/v1/agent/ready") == (200, '{"Ready": true}')
        for i in (1, 2):
            results = peers.connect(f"h{i}c2", "outage.service.consul", port, count=10,
                                    size=20000)
            assert sorted(ok_ids(results)) == ["outage-h1"] * 5 + ["outage-h2"] * 5
        assert call(agents[1], "PUT", "/v1/agent/service/register", late) == (200, "")
        owned = json.loads((agents[1].data_dir / "services.json").read_text())
        assert sorted(entry["id"] for entry in owned) == ["outage-h1", "outage-late"]
        assert endpoints(agents[1], "outage") == 2
    finally:
        mesh.etcd.start()

    for i in (1, 2):
        until(lambda i=i: not heartbeats(agents[i])["failing"], 15)
        assert heartbeats(agents[i]) == {"failing": False, "error": ""}
        since = agents[i].log()[logged[i]:]
        assert since.count("event=heartbeat-failed") == 1
        held = 2 if i == 1 else 1  # h1's agent holds the one registered during the outage
        assert since.count(f"event=heartbeat-resumed instances={held}") == 1
    peers.serve("h1c2", "outage-late", port)
    until(lambda: len(catalog(agents[1], "outage")) == 3, 15)
    # same create indexes: nothing was lost
    assert [e for e in catalog(agents[1], "outage") if e[0] != "outage-late"] == before
    assert ("event=re-register id=outage-late service=outage reason='registered through "
            "this agent while the registry was unavailable'") in agents[1].log()
    assert "event=register-deferred id=outage-late service=outage" in agents[1].log()
    for i in (1, 2):
        until(lambda i=i: endpoints(agents[i], "outage") == 3, 15)
    results = peers.connect("h2c2", "outage.service.consul", port, count=6, size=20000)
    assert sorted(ok_ids(results)) == ["outage-h1", "outage-h1", "outage-h2", "outage-h2",
                                       "outage-late", "outage-late"]
    for instance_id, owner in (("outage-late", 1), ("outage-h1", 1), ("outage-h2", 2)):
        agents[owner].api("PUT", f"/v1/agent/service/deregister/{instance_id}")
        peers.kill(instance_id)


def test_etcd_back_without_its_data_gets_every_owned_registration_again(mesh: Mesh) -> None:
    """etcd comes back empty (its data lost): each agent registers again what it owns,
    from its local copy (services.json), and the routes converge on it."""
    lab, agents, peers = mesh.lab, mesh.agents, mesh.peers
    port = 7304
    # The history a store in service has: registrations carry indexes that a store
    # started afresh only reaches later.
    etcdctl = f"etcdctl --endpoints {mesh.etcd.client_url} put /lab/history"
    lab.exec("h3", ["sh", "-c", f"for i in $(seq 30); do {etcdctl} $i >/dev/null; done"],
             env={**os.environ, "ETCDCTL_API": "3"}, check=True, timeout=60)
    expected = []
    for i in (1, 2):
        peers.serve(f"h{i}c1", f"wiped-h{i}", port)
        agents[i].register("wiped", f"wiped-h{i}", lab.container_ip(i, 1), port)
        expected.append((f"wiped-h{i}", lab.container_ip(i, 1), port))
    for i in (1, 2):
        until(lambda i=i: endpoints(agents[i], "wiped") == 2)
        owned = json.loads((agents[i].data_dir / "services.json").read_text())
        assert [entry["id"] for entry in owned] == [f"wiped-h{i}"]
    logged = {i: len(agents[i].log()) for i in (1, 2)}
    mesh.etcd.stop()
    shutil.rmtree(mesh.etcd_data)
    mesh.etcd.start()
    until(lambda: [entry[:3] for entry in catalog(agents[1], "wiped")] == expected, 20)
    for i in (1, 2):
        since = agents[i].log()[logged[i]:]
        # "the registry lost it (expired ...)" when a heartbeat failed during the restart,
        # "the registry lost its data (its index went back from ...)" when none did.
        assert (f"event=re-register id=wiped-h{i} service=wiped reason='the registry lost "
                ) in since, since
        assert "event=forget" not in since
        until(lambda i=i: endpoints(agents[i], "wiped") == 2, 15)
    for i in (1, 2):
        results = peers.connect(f"h{i}c2", "wiped.service.consul", port, count=4,
                                size=20000)
        assert sorted(ok_ids(results)) == ["wiped-h1"] * 2 + ["wiped-h2"] * 2


# -- 2. dockerd restarts under the agent's registrator ---------------------------------


WEB = "mkdir -p /www; echo {} >/www/index.html; exec httpd -f -p 80 -h /www"
FETCH = ("import sys,urllib.request as u\n"
         "for _ in range(int(sys.argv[2])):\n"
         "    print(u.urlopen(sys.argv[1],timeout=10).read().decode().strip())\n")


@dataclass
class DockerHost:
    """A lab host with a dockerd and an agent whose registrator watches it."""

    lab: labmod.Lab
    docker: LabDocker
    agent: LabAgent

    def web(self, name: str, port: int, restart: str = "") -> None:
        """A container of service "web" that answers its own name, on host port ``port``."""
        self.docker.run(name, ["sh", "-c", WEB.format(name)], publish={"80/tcp": port},
                        env={"SERVICE_NAME": "web"}, restart=restart)

    def registry(self) -> dict[str, tuple[str, int, int, int]]:
        """web's instances: id -> (address, port, create index, modify index)."""
        return {e["ServiceID"]: (e["ServiceAddress"], e["ServicePort"], e["CreateIndex"],
                                 e["ModifyIndex"])
                for e in self.agent.api("GET", "/v1/catalog/service/web")}

    def registered(self, ports: dict[str, int]) -> dict[str, tuple[str, int, int, int]]:
        """Wait until web's instances are the containers named in ``ports``, exactly."""
        ip = self.lab.bridge_ip(1)
        expected = {f"h1:{name}:80": (ip, port) for name, port in ports.items()}
        until(lambda: {key: entry[:2] for key, entry in self.registry().items()} == expected,
              30)
        until(lambda: endpoints(self.agent, "web") == len(ports))
        return self.registry()

    def running(self) -> list[str]:
        return sorted(c["Names"][0].lstrip("/") for c in self.docker.api.containers())

    def fetch(self, count: int) -> list[str]:
        """``count`` requests to http://web.service.consul/ from a container: who answered."""
        done = self.lab.exec("h1c1", [sys.executable, "-c", FETCH,
                                      "http://web.service.consul/", str(count)],
                             capture_output=True, text=True, timeout=60, check=True)
        return sorted(done.stdout.split())


@contextmanager
def docker_host(tmp_path_factory: pytest.TempPathFactory,
                *daemon_args: str) -> Iterator[DockerHost]:
    # A short directory: containerd's sockets under it must fit in 108 bytes.
    work = tmp_path_factory.mktemp("dk")
    with labmod.up(hosts=1, containers=1) as lab:
        docker = LabDocker(lab, 1, work / "dockerd", daemon_args=daemon_args).start()
        agent = LabAgent(lab, 1, work / "agent", work / "agent.log",
                         extra_args=["--docker-host", docker.url, *AGENT_ARGS])
        try:
            docker.import_image(busybox_image_tar())
            agent.start()
            yield DockerHost(lab, docker, agent)
        finally:
            agent.stop()
            docker.stop()


def test_dockerd_restart_under_the_agents_registrator(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """dockerd (by default) stops its containers when it stops and starts again only
    those with a restart policy. The agent's registrator reconnects and resyncs: the
    registry holds exactly the running containers, once each, and the routes follow."""
    with docker_host(tmp_path_factory) as host:
        host.web("kept", 8000, restart="always")
        host.web("lost", 8001)
        host.registered({"kept": 8000, "lost": 8001})
        assert host.fetch(4) == ["kept", "kept", "lost", "lost"]
        logged = len(host.agent.log())

        host.docker.stop(remove_containers=False)
        host.docker.start()
        until(lambda: host.running() == ["kept"], 30)
        host.registered({"kept": 8000})
        host.web("fresh", 8002)
        host.registered({"kept": 8000, "fresh": 8002})
        assert host.fetch(4) == ["fresh", "fresh", "kept", "kept"]
        since = host.agent.log()[logged:]
        assert "; reconnecting in 0.25s, then syncing" in since, since


def test_dockerd_restart_with_live_restore_changes_no_registration(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """With --live-restore the containers outlive dockerd: they keep serving by name
    while it is down, and once the registrator has reconnected and synced, the
    registry is exactly as before, the same registrations (indexes unchanged)."""
    with docker_host(tmp_path_factory, "--live-restore") as host:
        host.web("alpha", 8000)
        host.web("beta", 8001)
        before = host.registered({"alpha": 8000, "beta": 8001})
        logged = len(host.agent.log())

        host.docker.stop(remove_containers=False)
        assert host.fetch(4) == ["alpha", "alpha", "beta", "beta"]  # dockerd is down
        host.docker.start()
        assert host.running() == ["alpha", "beta"]
        until(lambda: host.agent.log()[logged:].count("Listening for Docker events") == 1, 30)
        host.web("gamma", 8002)
        after = host.registered({"alpha": 8000, "beta": 8001, "gamma": 8002})
        assert {key: after[key] for key in before} == before
        assert host.fetch(6) == ["alpha", "alpha", "beta", "beta", "gamma", "gamma"]


# -- 3. an agent killed with -9 and started again -------------------------------------


def dig(lab: labmod.Lab, where: str, host: int, name: str) -> str:
    """The answer section for ``name`` from host ``host``'s agent, asked from ``where``."""
    return str(lab.exec(where, ["dig", "+noall", "+answer", "+tries=3", "+time=2",
                                f"@{lab.bridge_ip(host)}", name],
                        capture_output=True, text=True, check=True).stdout)


def test_agent_killed_with_sigkill_comes_back_clean_with_the_same_vips(mesh: Mesh) -> None:
    """The killed agent leaves its rules behind (the kernel keeps them); the new one
    takes them over: the same rules, the same VIPs, and connections by name again."""
    lab, agent, peers = mesh.lab, mesh.agents[2], mesh.peers
    port = 7302
    peers.serve("h2c1", "sigkill-h2", port)
    agent.register("sigkill", "sigkill-h2", lab.container_ip(2, 1), port)
    until(lambda: endpoints(agent, "sigkill") == 1)
    rules = iptables_save(lab, 2)
    assert ":CONSULATE" in rules
    answer = dig(lab, "h2c2", 2, "sigkill.service.consul")
    vip = agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]["sigkill"]["vip"]
    assert answer == f"sigkill.service.consul.\t0\tIN\tA\t{vip}\n"

    assert agent.process is not None
    os.kill(agent.process.pid, signal.SIGKILL)
    agent.process.wait()
    agent.stop()
    assert iptables_save(lab, 2) == rules  # dangling: nobody serves port 10000 now
    [refused] = peers.connect("h2c2", vip, port)
    assert refused["error"] == "connect: ConnectionRefusedError(111, 'Connection refused')"

    agent.start()
    assert iptables_save(lab, 2) == rules  # the predecessor's chains, taken over
    assert dig(lab, "h2c2", 2, "sigkill.service.consul") == answer
    results = peers.connect("h2c2", "sigkill.service.consul", port, count=4, size=20000)
    assert ok_ids(results) == ["sigkill-h2"] * 4


# -- 4. loss and delay on a host's link -----------------------------------------------


def metric(agent: LabAgent, name: str, service: str) -> float:
    status, text = call(agent, "GET", "/metrics")
    assert status == 200
    pattern = rf'^consulate_{name}{{consulate_cluster="{service}"}} (\S+)$'
    found = re.findall(pattern, text, re.MULTILINE)
    assert len(found) == 1, (pattern, text)
    return float(found[0])


def test_loss_and_delay_on_a_link_retry_eject_and_return(mesh: Mesh) -> None:
    """Endpoints on h2 and h3, registered through h1's agent (whose own link stays
    clean, so the heartbeats keep them); faults on h2's link, clients on h1."""
    lab, agent, peers = mesh.lab, mesh.agents[1], mesh.peers
    port = 7303
    peers.serve("h2c1", "link-h2", port)
    peers.serve("h3c1", "link-h3", port)
    agent.register("link", "link-h2", lab.container_ip(2, 1), port)
    agent.register("link", "link-h3", lab.container_ip(3, 1), port)
    until(lambda: endpoints(agent, "link") == 2)
    fault = LinkFault(lab, 2)
    logged = len(agent.log())
    try:
        # 200 ms more on the way in, well under the connect timeout: all connect, slower.
        fault.delay(0.2)
        results = peers.connect("h1c2", "link.service.consul", port, count=6, size=20000)
        assert sorted(ok_ids(results)) == ["link-h2"] * 3 + ["link-h3"] * 3
        # A connection to h2 waits for its SYN and then its data to pass the delay.
        assert min(r["elapsed"] for r in results if r["id"] == "link-h2") >= 0.4
        assert metric(agent, "upstream_cx_connect_fail_total", "link") == 0

        # Everything lost: each connect to h2 times out and the proxy retries on h3;
        # the fifth timeout in a row ejects h2.
        fault.loss(1.0)
        eject = (f"event=eject service=link endpoint=link-h2 address={lab.container_ip(2, 1)}:"
                 f"{port} type=consecutive_connect_failure failures=5 num_ejections=1 "
                 f"ejection_time={BASE_EJECTION:.3f}")
        tries = 0
        while eject not in agent.log()[logged:]:
            assert tries < 12, agent.log()[logged:]
            assert ok_ids(peers.connect("h1c2", "link.service.consul", port)) == ["link-h3"]
            tries += 1
        results = peers.connect("h1c2", "link.service.consul", port, count=4)
        assert ok_ids(results) == ["link-h3"] * 4  # h2 is out: not even tried
        assert metric(agent, "upstream_cx_connect_fail_total", "link") == 5
        assert metric(agent, "outlier_detection_ejections_total", "link") == 1
        assert metric(agent, "outlier_detection_ejections_active", "link") == 1
        assert metric(agent, "upstream_cx_none_healthy_total", "link") == 0
        assert agent.log()[logged:].count("event=connect-failed service=link") == 5
    finally:
        fault.clear()
    # The link is clean again: h2 returns once its ejection time is over.
    uneject = (f"event=uneject service=link endpoint=link-h2 "
               f"address={lab.container_ip(2, 1)}:{port}")
    until(lambda: uneject in agent.log()[logged:], BASE_EJECTION + 10)
    assert metric(agent, "outlier_detection_ejections_active", "link") == 0
    results = peers.connect("h1c2", "link.service.consul", port, count=4, size=20000)
    assert sorted(ok_ids(results)) == ["link-h2"] * 2 + ["link-h3"] * 2
    assert metric(agent, "upstream_cx_connect_fail_total", "link") == 5

    # 30% lost: a connect whose SYN is lost times out and is retried on h3, lost data
    # is sent again by TCP; every connection echoes. Eight connections try h2 first
    # four times: never the five failures in a row that would eject it.
    logged = len(agent.log())
    fault.loss(0.3)
    try:
        results = peers.run("h1c2", "connect", "--host", "link.service.consul", "--port",
                            str(port), "--count", "8", "--size", "1000", "--timeout", "30")
    finally:
        fault.clear()
    reached = ok_ids(results)
    failed = agent.log()[logged:].count("event=connect-failed service=link endpoint=link-h2 ")
    assert reached.count("link-h2") == 4 - failed and reached.count("link-h3") == 4 + failed
    assert metric(agent, "upstream_cx_connect_fail_total", "link") == 5 + failed
    assert metric(agent, "outlier_detection_ejections_total", "link") == 1
    assert metric(agent, "upstream_cx_none_healthy_total", "link") == 0
    print(f"30% loss on h2's link: {failed} of 4 connects to h2 timed out and were retried")
