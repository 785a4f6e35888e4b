"""The DNS responder end to end: ``dig`` in a lab container against a running agent.

The agent in h1 runs with the DNS flags of issue 4 (an alternative domain, a
recursor, service TTLs, node metadata, a negative TTL). Its recursor is a fake
resolver (dnslib's fixedresolver) on 127.0.0.2 inside h1 that answers every name
with 192.0.2.7 and logs what it was asked: nothing leaves the lab.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent

pytestmark = pytest.mark.lab

UPSTREAM = "127.0.0.2:5353"
SOA = "ns.consul. hostmaster.consul."


@pytest.fixture(scope="module")
def dns_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[labmod.Lab, LabAgent,
                                                                         Path]]:
    work = tmp_path_factory.mktemp("dns")
    upstream_log = work / "upstream.log"
    with labmod.up(hosts=1, containers=1) as lab, open(upstream_log, "wb") as log:
        upstream = lab.popen("h1", [sys.executable, "-u", "-m", "dnslib.fixedresolver",
                                    "--response", ". 60 IN A 192.0.2.7", "--address",
                                    "127.0.0.2", "--port", "5353", "--tcp", "--log", "request"],
                             stdout=log, stderr=subprocess.STDOUT)
        agent = LabAgent(lab, 1, work / "data", work / "agent.log", extra_args=[
            "--no-iptables", "--alt-domain", "mesh.internal", "--recursor", UPSTREAM,
            "--recursor-timeout", "1", "--service-ttl", "web=30", "--service-ttl", "big*=5",
            "--node-meta", "rack=r1", "--dns-soa-min-ttl", "15",
        ])
        try:
            agent.start()
            yield lab, agent, upstream_log
        finally:
            agent.stop()
            upstream.kill()
            upstream.wait()


def dig(lab: labmod.Lab, *args: str, where: str = "h1c1") -> str:
    """dig through the container's resolver (the agent on the bridge, port 53)."""
    done = lab.exec(where, ["dig", "+tries=1", "+time=3", *args], capture_output=True,
                    text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return str(done.stdout)


def section(output: str, name: str) -> list[tuple[str, ...]]:
    """The records of one section of dig's output, as sorted tuples of fields."""
    match = re.search(rf";; {name} SECTION:\n(.*?)(?:\n\n|\Z)", output, re.S)
    if match is None:
        return []
    return sorted(tuple(line.split()) for line in match.group(1).splitlines()
                  if not line.startswith(";"))


def header(output: str) -> tuple[str, list[str]]:
    status = re.search(r"status: (\w+)", output)
    flags = re.search(r";; flags: ([\w ]+);", output)
    assert status is not None and flags is not None, output
    return status.group(1), flags.group(1).split()


def vip_of(agent: LabAgent, name: str) -> str:
    return str(agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"][name]["vip"])


def register(agent: LabAgent, name: str, ident: str, address: str, port: int,
             **extra: object) -> None:
    agent.api("PUT", "/v1/agent/service/register",
              {"ID": ident, "Name": name, "Address": address, "Port": port, **extra})


def test_a_srv_glue_node_txt_and_ptr(dns_lab: tuple[labmod.Lab, LabAgent, Path]) -> None:
    lab, agent, _ = dns_lab
    register(agent, "web", "web-1", lab.container_ip(1, 1), 8080, Weights={"Passing": 5})
    register(agent, "web", "web-2", lab.bridge_ip(1), 8081, Tags=["v2"])
    vip = vip_of(agent, "web")
    out = dig(lab, "web.service.consul")
    assert header(out) == ("NOERROR", ["qr", "aa", "rd", "ra"])
    assert section(out, "ANSWER") == [("web.service.consul.", "30", "IN", "A", vip)]

    out = dig(lab, "SRV", "_web._tcp.service.consul")
    assert section(out, "ANSWER") == [
        ("_web._tcp.service.consul.", "30", "IN", "SRV", "1", "1", "8081", "h1.node.dc1.consul."),
        ("_web._tcp.service.consul.", "30", "IN", "SRV", "1", "5", "8080",
         "0a64010b.addr.dc1.consul."),
    ]
    assert section(out, "ADDITIONAL") == [
        ("0a64010b.addr.dc1.consul.", "30", "IN", "A", lab.container_ip(1, 1)),
        ("h1.node.dc1.consul.", "30", "IN", "A", lab.bridge_ip(1)),
    ]
    out = dig(lab, "ANY", "h1.node.consul")
    assert section(out, "ANSWER") == [("h1.node.consul.", "0", "IN", "A", lab.bridge_ip(1)),
                                      ("h1.node.consul.", "0", "IN", "TXT", '"rack=r1"')]
    out = dig(lab, "-x", vip)
    assert section(out, "ANSWER") == [(".".join(reversed(vip.split("."))) + ".in-addr.arpa.",
                                       "0", "IN", "PTR", "web.service.dc1.consul.")]
    out = dig(lab, "+short", "v2.web.service.mesh.internal")
    assert out.split() == [lab.bridge_ip(1)]  # a tag asks for instance addresses


def test_negative_answers_carry_the_soa(dns_lab: tuple[labmod.Lab, LabAgent, Path]) -> None:
    lab, agent, _ = dns_lab
    register(agent, "db", "db-1", lab.container_ip(1, 1), 5432)
    out = dig(lab, "nosuch.service.consul")
    assert header(out) == ("NXDOMAIN", ["qr", "aa", "rd", "ra"])
    [soa] = section(out, "AUTHORITY")
    assert soa[:5] == ("consul.", "15", "IN", "SOA", "ns.consul.")
    assert soa[5:] == ("hostmaster.consul.", soa[6], "3600", "600", "86400", "15")
    out = dig(lab, "AAAA", "db.service.consul")
    assert header(out)[0] == "NOERROR" and section(out, "ANSWER") == []
    assert section(out, "AUTHORITY")[0][3] == "SOA"
    # dig asks for zone transfers over TCP and reports a NOTIMP reply this way (a
    # server that did not answer would be "communications error" instead).
    assert dig(lab, "AXFR", "consul").splitlines()[-1] == "; Transfer failed."


def test_truncated_over_udp_then_all_200_over_tcp(
    dns_lab: tuple[labmod.Lab, LabAgent, Path]
) -> None:
    lab, _, _ = dns_lab
    bodies = [{"ID": f"big-{i}", "Name": "big", "Address": f"10.7.{i // 200}.{i % 200 + 1}",
               "Port": 9000 + i} for i in range(200)]
    script = ("import json,sys,urllib.request as u\n"
              "for b in json.load(sys.stdin):\n"
              "  u.urlopen(u.Request('http://127.0.0.1:8500/v1/agent/service/register',"
              "data=json.dumps(b).encode(),method='PUT'),timeout=5).read()\n")
    done = lab.exec("h1", [sys.executable, "-c", script], input=json.dumps(bodies).encode(),
                    capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    cut = dig(lab, "+ignore", "SRV", "big.service.consul")  # +ignore: show the UDP answer
    assert "tc" in header(cut)[1]
    kept = section(cut, "ANSWER")
    assert 0 < len(kept) < 200
    assert len(section(cut, "ADDITIONAL")) == len(kept)  # each target with its glue
    assert "MSG SIZE  rcvd: " in cut and int(cut.split("MSG SIZE  rcvd: ")[1].split()[0]) <= 1232
    whole = dig(lab, "SRV", "big.service.consul")  # dig retries over TCP on TC=1
    assert "Truncated, retrying in TCP mode." in whole
    assert len(section(whole, "ANSWER")) == 200
    assert len(section(whole, "ADDITIONAL")) == 200
    assert {r[1] for r in section(whole, "ANSWER")} == {"5"}  # --service-ttl big*=5


def test_a_registration_is_answered_at_once(dns_lab: tuple[labmod.Lab, LabAgent, Path]) -> None:
    lab, agent, _ = dns_lab
    assert header(dig(lab, "fresh.service.consul"))[0] == "NXDOMAIN"
    register(agent, "fresh", "fresh-1", lab.container_ip(1, 1), 80)
    started = time.monotonic()
    out = dig(lab, "+short", "fresh.service.consul")  # no retry loop: the first query
    assert out.split() == [vip_of(agent, "fresh")]
    assert time.monotonic() - started < 5
    agent.api("PUT", "/v1/agent/service/deregister/fresh-1")
    assert header(dig(lab, "fresh.service.consul"))[0] == "NXDOMAIN"


def test_out_of_zone_names_go_to_the_recursor_and_in_zone_never(
    dns_lab: tuple[labmod.Lab, LabAgent, Path]
) -> None:
    lab, _, upstream_log = dns_lab
    out = dig(lab, "www.example.org")
    # relayed as the upstream sent it (dnslib echoes dig's AD), but not authoritative
    assert header(out) == ("NOERROR", ["qr", "rd", "ra", "ad"])
    assert section(out, "ANSWER") == [("www.example.org.", "60", "IN", "A", "192.0.2.7")]
    out = dig(lab, "+tcp", "tcp.example.org")
    assert section(out, "ANSWER") == [("tcp.example.org.", "60", "IN", "A", "192.0.2.7")]
    dig(lab, "nosuch.service.consul")
    dig(lab, "nosuch.service.mesh.internal")
    asked = upstream_log.read_text()
    assert "www.example.org." in asked and "tcp.example.org." in asked
    assert ".consul." not in asked and "mesh.internal" not in asked


def test_the_agent_answers_over_tcp_on_loopback_too(
    dns_lab: tuple[labmod.Lab, LabAgent, Path]
) -> None:
    lab, agent, _ = dns_lab
    register(agent, "api", "api-1", lab.container_ip(1, 1), 80)
    out = dig(lab, "@127.0.0.1", "-p", "8600", "+tcp", "+short", "api.service.consul",
              where="h1")
    assert out.split() == [vip_of(agent, "api")]
