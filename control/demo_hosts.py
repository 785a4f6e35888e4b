"""``consulate demo --hosts 3``: the mesh across hosts, and a host failure, narrated.

Three lab hosts each run an agent; the agents share one registry: a 3-member etcd
cluster, one member per host, when etcd is installed, else the embedded registry
in h1's agent with h2's and h3's agents ``--join``-ed to it. Service ``web`` has
an instance in a container on h2 and one on h3; a container on h1 calls it by
name and sees both answer. Then h3 is cut off the lab's fabric (its link down):
its agent can no longer renew its instance, which leaves every route table after
the liveness TTL, and h1's calls all go to h2. h3 plugged back, its agent
registers its instance again and h1's calls reach both once more.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time

from consulate.control import lab as labs
from consulate.control.demo import URL, DemoError, LabDemo
from consulate.control.labagent import LabAgent
from consulate.control.labetcd import EtcdProcess

HOSTS = (1, 2, 3)
SERVERS = (2, 3)  # the hosts whose container serves web
LIVENESS_TTL = 3.0  # the agents' --liveness-ttl: how long a cut-off host's instance stays
# An etcd leader election (which extends leases) on a busy machine can add to the TTL.
LEAVE_TIMEOUT = LIVENESS_TTL + 12
RETURN_TIMEOUT = 30.0  # h3 back: etcd catches up, its agent re-registers
TOKEN_LENGTH = 16
LOG_TAIL = 6  # lines of each agent's log shown on a failure


class HostsDemo(LabDemo):
    """Three hosts, a shared registry, web on h2 and h3, the client in h1's container."""

    steps = 8

    def __init__(self) -> None:
        super().__init__(hosts=3, containers=1)
        self.use_etcd = shutil.which("etcd") is not None
        # The embedded registry listens off loopback on h1: its API then needs a token.
        self.token = "" if self.use_etcd else os.urandom(TOKEN_LENGTH).hex()
        self.members: list[EtcdProcess] = []
        self.agents: dict[int, LabAgent] = {}
        self.unplugged = False

    def agent_args(self, host: int) -> list[str]:
        ttl = ["--liveness-ttl", f"{LIVENESS_TTL:g}s"]
        if self.use_etcd:
            return ["--registry", "etcd://" + ",".join(
                f"{self.lab.host_ip(i)}:2379" for i in HOSTS), *ttl]
        if host == 1:
            return ["--http-addr", "0.0.0.0:8500", *ttl]
        return ["--join", f"{self.lab.host_ip(1)}:8500", *ttl]

    def run(self) -> None:
        with self.narrate("Building a lab: 3 hosts on one fabric, 1 container each "
                          "(network namespaces, no route out)") as shown:
            labs.up(3, 1, name=self.name)
            shown.append(f"lab {self.name}: " + ", ".join(
                f"h{i} {self.lab.host_ip(i)} (container {self.lab.container_ip(i, 1)})"
                for i in HOSTS))

        if self.use_etcd:
            with self.narrate("Starting the registry: a 3-member etcd cluster, one member "
                              "per host") as shown:
                initial = ",".join(f"h{i}=http://{self.lab.host_ip(i)}:2380" for i in HOSTS)
                for i in HOSTS:
                    self.members.append(EtcdProcess(
                        self.work / f"etcd-h{i}", self.lab.host_ip(i), f"h{i}",
                        prefix=["ip", "netns", "exec", self.lab.host_ns(i)],
                        cluster=initial).launch())
                for member in self.members:
                    member.wait_healthy()
                shown.append("members " + ", ".join(m.client_url for m in self.members))
        else:
            with self.narrate("Registry: etcd is not installed, so h1's agent embeds it "
                              "and the others --join h1") as shown:
                shown.append(f"h2 and h3: --join {self.lab.host_ip(1)}:8500 (with a token: "
                             "h1's API listens off loopback)")

        with self.narrate(f"Starting an agent on h1, h2 and h3 (--liveness-ttl "
                          f"{LIVENESS_TTL:g}s)") as shown:
            for i in HOSTS:
                self.agents[i] = LabAgent(self.lab, i, self.work / f"agent-h{i}",
                                          self.work / f"agent-h{i}.log", token=self.token,
                                          extra_args=self.agent_args(i)).start()
                shown.append(f"h{i}: consulate agent " + " ".join(self.agent_args(i)))

        with self.narrate("Starting web servers in containers on h2 and h3, each "
                          "registered by its host's agent") as shown:
            for i in SERVERS:
                backend = f"web-h{i}"
                ip = self.serve_web(i, 1, backend)
                self.agents[i].register("web", backend, ip, 80)
                shown.append(f"{backend}: busybox httpd in h{i}c1 at {ip}:80, registered "
                             f"through h{i}'s agent")
            self.wait_for("web-h2 and web-h3 in h1's route table",
                          lambda: self.endpoints(1) == ["web-h2", "web-h3"], RETURN_TIMEOUT)
            shown.append("h1's route table: web -> web-h2, web-h3")

        with self.narrate(f"Calling {URL} 4 times from h1c1: answered on the other "
                          "hosts") as shown:
            answered = self.call_web("h1c1", 4, shown)
            if set(answered) != {"web-h2", "web-h3"}:
                raise DemoError(f"expected answers from web-h2 and web-h3, got {answered}")

        with self.narrate("Cutting h3 off the fabric (its link down): its instance leaves "
                          "the routes after the TTL") as shown:
            self.link(3, "down")
            cut_at = time.monotonic()
            shown.append(f"ip -n {self.lab.fabric_ns} link set h3 down")
            self.wait_for("web-h3 leaving h1's route table",
                          lambda: self.endpoints(1) == ["web-h2"], LEAVE_TIMEOUT)
            shown.append(f"web-h3 left h1's routes {time.monotonic() - cut_at:.1f} s after "
                         f"the cut (TTL {LIVENESS_TTL:g} s)")
            answered = self.call_web("h1c1", 4, shown)
            if set(answered) != {"web-h2"}:
                raise DemoError(f"expected every answer from web-h2, got {answered}")

        with self.narrate("Plugging h3 back: its agent registers web-h3 again") as shown:
            self.link(3, "up")
            back_at = time.monotonic()
            shown.append(f"ip -n {self.lab.fabric_ns} link set h3 up")
            self.wait_for("web-h3 back in h1's route table",
                          lambda: self.endpoints(1) == ["web-h2", "web-h3"], RETURN_TIMEOUT)
            shown.append(f"web-h3 back in h1's routes {time.monotonic() - back_at:.1f} s "
                         "after the link came up")
            answered = self.call_web("h1c1", 4, shown)
            if set(answered) != {"web-h2", "web-h3"}:
                raise DemoError(f"expected answers from web-h2 and web-h3, got {answered}")

    def link(self, host: int, state: str) -> None:
        """Cut a host off the fabric, or plug it back: the far end of its veth."""
        subprocess.run(["ip", "-n", self.lab.fabric_ns, "link", "set", f"h{host}", state],
                       check=True, capture_output=True, timeout=10)
        self.unplugged = state == "down"

    def endpoints(self, host: int) -> list[str]:
        """The endpoint ids of web in a host's route table, sorted."""
        routes = self.agents[host].api("GET", "/v1/agent/routes")
        return sorted(e["ID"] for r in routes if r["Service"] == "web" for e in r["Endpoints"])

    def teardown(self) -> None:
        """Agents first (SIGTERM: each removes its iptables rules), web servers, etcd,
        the lab, temporary files."""
        self.step = self.steps - 1  # teardown is the last step, whichever step failed
        etcd = "etcd, " if self.use_etcd else ""
        with self.narrate(f"Tearing down: agents, web servers, {etcd}lab, temporary files"):
            if self.unplugged:  # agents leave faster when they can reach the registry
                with contextlib.suppress(subprocess.SubprocessError):
                    self.link(3, "up")
            codes = {i: agent.stop() for i, agent in self.agents.items()}
            for i, agent in self.agents.items():
                self.agent_log += [f"h{i}: {line}"
                                   for line in agent.log().splitlines()[-LOG_TAIL:]]
            self.stop_backends()
            for member in self.members:
                member.stop()
            labs.down(self.name)
            shutil.rmtree(self.work, ignore_errors=True)
            failed = {i: code for i, code in codes.items() if code != 0}
            if failed:
                raise DemoError("agents exited non-zero on SIGTERM: " + ", ".join(
                    f"h{i} {code}" for i, code in failed.items()))
