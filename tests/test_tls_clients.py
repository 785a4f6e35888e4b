"""The agent's own clients over TLS, with real handshakes in the lab: its registrator
registering a real container (lab dockerd) into an agent serving https with
client-certificate verification; the standalone registrator's Consul adapters
with registrator's ``consul-tls://`` and Consul's CONSUL_* variables; and an
agent that ``--join``s another over https and shares its registry.

The agent h1 serves TLS (``--tls-cert/--tls-key/--tls-ca``, ``--token``) on
0.0.0.0:8500; every client runs in a lab namespace. Certificates come from the
openssl CLI, fresh for the module. Wrong CAs fail with errors naming the flag or
variable to fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from labpki import Pki, issue, new_ca

from consulate.control import lab as labmod
from consulate.control.labagent import LabAgent
from consulate.control.labdocker import LabDocker, busybox_image_tar

pytestmark = pytest.mark.lab

TOKEN = "tls-clients-token-5d1e"
HTTPD = ["sh", "-c", "mkdir /www; echo hello >/www/index.html; httpd -f -p 80 -h /www"]


@pytest.fixture(scope="module")
def lab() -> Iterator[labmod.Lab]:
    with labmod.up(hosts=2, containers=1) as built:
        yield built


@pytest.fixture(scope="module")
def pki(lab: labmod.Lab, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA that signed the agent's certificate (a server and client one, as Consul's
    agent certificates are) and a client's; a rogue CA for the wrong-CA cases."""
    work = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        new_ca(ca, work)
    issue("agent", "ca", "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName="
           f"IP:{lab.host_ip(1)},IP:{lab.bridge_ip(1)}\n", work)
    issue("client", "ca", "extendedKeyUsage=clientAuth\n", work)
    # the same CA and names as the agent's: a CA-based check could not tell them apart
    issue("other-agent", "ca", "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName="
           f"IP:{lab.host_ip(1)},IP:{lab.bridge_ip(1)}\n", work)
    return Pki(work)


# One call of an https API from inside a lab namespace, with Python's ssl.
HTTPS_CALL = """
import json,ssl,sys,urllib.request as u
a=json.loads(sys.argv[1])
c=ssl.create_default_context(cafile=a['ca'])
c.load_cert_chain(a['cert'],a['key'])
r=u.Request(a['url'],data=a['body'].encode() or None,method=a['method'],
            headers={'X-Consul-Token':a['token']})
sys.stdout.buffer.write(u.urlopen(r,context=c,timeout=5).read())
"""


class TlsLabAgent(LabAgent):
    """A LabAgent whose API serves https: called with the CA and the client's certificate."""

    pki: Pki

    def api(self, method: str, path: str, body: object = None) -> Any:
        call = {"url": f"https://{self.lab.bridge_ip(self.host)}:8500{path}", "method": method,
                "ca": self.pki["ca.pem"], "cert": self.pki["client.pem"],
                "key": self.pki["client.key"], "token": self.token,
                "body": json.dumps(body) if body is not None else ""}
        done = self.lab.exec(self.where, [sys.executable, "-c", HTTPS_CALL, json.dumps(call)],
                             capture_output=True, timeout=15)
        if done.returncode != 0:
            raise OSError(f"{method} {path} failed: {done.stderr.decode(errors='replace')}")
        return json.loads(done.stdout) if done.stdout else None


@pytest.fixture(scope="module")
def docker(lab: labmod.Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabDocker]:
    daemon = LabDocker(lab, 1, tmp_path_factory.mktemp("dockerd")).start()
    try:
        daemon.import_image(busybox_image_tar())
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def tls_agent(lab: labmod.Lab, pki: Pki, docker: LabDocker,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsLabAgent]:
    """h1's agent: TLS with client certificates required, and its own registrator on."""
    work = tmp_path_factory.mktemp("tls-agent")
    agent = TlsLabAgent(lab, 1, work / "data", work / "agent.log", token=TOKEN, extra_args=[
        "--no-iptables", "--http-addr", "0.0.0.0:8500", "--docker-host", docker.url,
        "--tls-cert", pki["agent.pem"], "--tls-key", pki["agent.key"],
        "--tls-ca", pki["ca.pem"]])
    agent.pki = pki
    try:
        yield agent.start()
    finally:
        agent.stop()


def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.1)


def catalog(agent: LabAgent, name: str) -> list[tuple[str, str, int]]:
    return [(e["ServiceID"], e["ServiceAddress"], e["ServicePort"])
            for e in agent.api("GET", f"/v1/catalog/service/{name}")]


def test_the_agents_own_registrator_registers_a_container_over_tls(
        lab: labmod.Lab, docker: LabDocker, tls_agent: TlsLabAgent) -> None:
    cid = docker.run("web1", HTTPD, env={"SERVICE_NAME": "web"}, publish={"80/tcp": 8080})
    until(lambda: catalog(tls_agent, "web") == [("h1:web1:80", lab.bridge_ip(1), 8080)])
    docker.api.remove_container(cid, force=True)
    until(lambda: catalog(tls_agent, "web") == [])
    assert ("event=registrator state=on docker=" + docker.url + " registry=consulate://"
            "127.0.0.1:8500") in tls_agent.log()


# The standalone registrator's adapter, from inside a lab namespace: register one
# service, read the agent's entry for it, deregister it; or the error's text.
ADAPTER_ROUND_TRIP = """
import asyncio,json,os,sys
from consulate.control.registrator.adapters import open_adapter
from consulate.control.registrator.adapters.consul import ConsulateAdapter
from consulate.control.registrator.adapters.consul_tls import own_agent_https
from consulate.control.registrator.model import Origin,Service
a=json.loads(sys.argv[1])
os.environ.update(a['env'])
async def main():
    if a['pin']:
        https=own_agent_https(*a['pin'],client_cert=True)
        adapter=ConsulateAdapter(a['uri'],'h1','127.0.0.1',8500,https)
    else:
        adapter=open_adapter(a['uri'],'h1')
    s=Service(id='h1:db1:5432',name='db',ip='10.100.1.7',port=5432,
              origin=Origin('c0ffee','db1','db1','5432','tcp'))
    try:
        await adapter.register(s)
        ids=await adapter.registered()
        entry=(await adapter.http.call('GET','/v1/agent/services'))[s.id]
        await adapter.remove(s.id)
        return [ids,[entry['Service'],entry['Address'],entry['Port']],await adapter.registered()]
    finally:
        await adapter.close()
try:
    print(json.dumps(asyncio.run(main())))
except Exception as e:
    print(json.dumps(f'{type(e).__name__}: {e}'))
"""


def adapter_round_trip(lab: labmod.Lab, uri: str, env: dict[str, str],
                       pin: tuple[str, str] | None = None) -> Any:
    """In h1: the adapter for ``uri``, or with ``pin`` (a certificate and its key) the
    agent's own registrator's, pinned to that certificate, at 127.0.0.1:8500."""
    call = {"uri": uri, "env": {"CONSUL_HTTP_TOKEN": TOKEN, **env}, "pin": pin}
    done = lab.exec("h1", [sys.executable, "-c", ADAPTER_ROUND_TRIP, json.dumps(call)],
                    capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_agents_own_registrator_trusts_its_own_certificate_only(
        lab: labmod.Lab, pki: Pki, tls_agent: TlsLabAgent) -> None:
    own = (pki["agent.pem"], pki["agent.key"])
    assert adapter_round_trip(lab, "consulate://127.0.0.1:8500", {}, own) == [
        ["h1:db1:5432"], ["db", "10.100.1.7", 5432], []]
    # another certificate of the same CA, for the same addresses, is not the agent's
    other = (pki["other-agent.pem"], pki["other-agent.key"])
    error = adapter_round_trip(lab, "consulate://127.0.0.1:8500", {}, other)
    assert error.startswith("AdapterError: TLS with consulate agent at https://127.0.0.1:8500 "
                            "failed (ClientConnectorCertificateError: ")
    assert "certificate verify failed" in error
    assert error.endswith("): the agent's own registrator trusts --tls-cert only and presents "
                          "it as its client certificate: --tls-cert must be signed by --tls-ca "
                          "and allowed for client authentication (no extendedKeyUsage, or one "
                          "with clientAuth), or pass --no-registrator")


def test_registrators_consul_tls_scheme_with_its_variables(
        lab: labmod.Lab, pki: Pki, tls_agent: TlsLabAgent) -> None:
    env = {"CONSUL_CACERT": pki["ca.pem"], "CONSUL_TLSCERT": pki["client.pem"],
           "CONSUL_TLSKEY": pki["client.key"]}
    assert adapter_round_trip(lab, f"consul-tls://{lab.bridge_ip(1)}:8500", env) == [
        ["h1:db1:5432"], ["db", "10.100.1.7", 5432], []]


def test_consuls_variables_turn_https_on_for_the_consulate_scheme(
        lab: labmod.Lab, pki: Pki, tls_agent: TlsLabAgent) -> None:
    env = {"CONSUL_HTTP_SSL": "true", "CONSUL_CACERT": pki["ca.pem"],
           "CONSUL_CLIENT_CERT": pki["client.pem"], "CONSUL_CLIENT_KEY": pki["client.key"]}
    assert adapter_round_trip(lab, f"consulate://{lab.bridge_ip(1)}:8500", env) == [
        ["h1:db1:5432"], ["db", "10.100.1.7", 5432], []]


def test_the_adapter_with_the_wrong_ca_names_the_variable(
        lab: labmod.Lab, pki: Pki, tls_agent: TlsLabAgent) -> None:
    env = {"CONSUL_HTTP_SSL": "1", "CONSUL_CACERT": pki["rogue-ca.pem"],
           "CONSUL_CLIENT_CERT": pki["client.pem"], "CONSUL_CLIENT_KEY": pki["client.key"]}
    error = adapter_round_trip(lab, f"consul://{lab.bridge_ip(1)}:8500", env)
    assert error.startswith(f"AdapterError: TLS with Consul at https://{lab.bridge_ip(1)}:8500 "
                            "failed (ClientConnectorCertificateError: ")
    assert error.endswith("): set CONSUL_CACERT to the CA that signed its certificate, and "
                          "CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY if it verifies clients")
    assert "certificate verify failed" in error


def test_the_server_name_and_verify_variables_are_honoured(
        lab: labmod.Lab, pki: Pki, tls_agent: TlsLabAgent) -> None:
    client = {"CONSUL_CLIENT_CERT": pki["client.pem"], "CONSUL_CLIENT_KEY": pki["client.key"]}
    uri = f"consul-tls://{lab.bridge_ip(1)}:8500"
    error = adapter_round_trip(lab, uri, {"CONSUL_CACERT": pki["ca.pem"],
                                          "CONSUL_TLS_SERVER_NAME": "agent.example", **client})
    assert error.startswith("AdapterError: TLS with Consul at ")
    assert "Hostname mismatch, certificate is not valid for 'agent.example'" in error
    # no check at all: even a certificate of an unknown CA passes (logged as a warning)
    assert adapter_round_trip(lab, uri, {"CONSUL_CACERT": pki["rogue-ca.pem"],
                                         "CONSUL_HTTP_SSL_VERIFY": "false", **client}) == [
        ["h1:db1:5432"], ["db", "10.100.1.7", 5432], []]


def test_plain_http_to_a_tls_agent_says_how_to_turn_tls_on(
        lab: labmod.Lab, tls_agent: TlsLabAgent) -> None:
    error = adapter_round_trip(lab, f"consul://{lab.bridge_ip(1)}:8500", {})
    assert error.startswith(f"AdapterError: Consul at http://{lab.bridge_ip(1)}:8500 closed "
                            "the connection without an answer (")
    assert error.endswith("): if it serves TLS, use consul-tls:// or set CONSUL_HTTP_SSL=true")


@pytest.mark.parametrize(("env", "message"), [
    ({"CONSUL_HTTP_SSL": "yes"},
     "CONSUL_HTTP_SSL='yes' is not a boolean: use true or false"),
    ({"CONSUL_HTTP_SSL": "true", "CONSUL_CACERT": "/nonexistent/ca.pem"},
     "CONSUL_CACERT '/nonexistent/ca.pem' cannot be read (No such file or directory): give "
     "the path of a PEM file this user can read"),
    ({"CONSUL_HTTP_SSL": "true", "CONSUL_CLIENT_CERT": "/tmp/c.pem"},
     "CONSUL_CLIENT_CERT is given without CONSUL_CLIENT_KEY: a client certificate needs its "
     "key"),
])
def test_the_standalone_registrator_refuses_bad_tls_variables(
        env: dict[str, str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "consulate.control.cli", "registrator",
                           "consul://127.0.0.1:8500"], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (1, f"consulate: error: {message}\n")


def start_joined(lab: labmod.Lab, work: Path, *extra: str) -> LabAgent:
    """h2's agent, its registry h1's over https (answering is enough: it may be refused)."""
    return LabAgent(lab, 2, work / "data", work / "agent.log", token=TOKEN, extra_args=[
        "--no-iptables", "--no-registrator", "--join", f"https://{lab.host_ip(1)}:8500",
        *extra]).start(ready=False)


def test_an_agent_joined_over_https_shares_the_registry(
        lab: labmod.Lab, pki: Pki, tls_agent: TlsLabAgent, tmp_path: Path) -> None:
    joined = start_joined(lab, tmp_path, "--ca-file", pki["ca.pem"], "--client-cert",
                          pki["client.pem"], "--client-key", pki["client.key"])
    try:
        tls_agent.register("pg", "pg-1", "10.100.1.20", 5432)
        until(lambda: catalog(joined, "pg") == [("pg-1", "10.100.1.20", 5432)])
        joined.register("cache", "cache-1", "10.100.2.30", 6379)
        until(lambda: catalog(tls_agent, "cache") == [("cache-1", "10.100.2.30", 6379)])
    finally:
        joined.stop()


def test_joining_with_the_wrong_ca_names_the_flag(
        lab: labmod.Lab, pki: Pki, tls_agent: TlsLabAgent, tmp_path: Path) -> None:
    joined = start_joined(lab, tmp_path, "--ca-file", pki["rogue-ca.pem"], "--client-cert",
                          pki["client.pem"], "--client-key", pki["client.key"])
    try:
        until(lambda: "TLS with the agent" in joined.log())
    finally:
        joined.stop()
    assert (f"TLS with the agent at https://{lab.host_ip(1)}:8500 failed (") in joined.log()
    assert ("): pass --ca-file with the CA that signed its certificate, and --client-cert and "
            "--client-key if it verifies clients (--tls-ca)") in joined.log()
    assert "certificate verify failed" in joined.log()


@pytest.mark.parametrize(("args", "message"), [
    (["--join", "127.0.0.1:8500", "--ca-file", "/tmp/ca.pem"],
     "--ca-file is for an agent reached over TLS: use it with --join https://HOST:PORT or "
     "--registry https://HOST:PORT (the registry is http://127.0.0.1:8500)"),
    (["--join", "https://127.0.0.1:8500", "--ca-file", "/nonexistent/ca.pem"],
     "--ca-file '/nonexistent/ca.pem' cannot be read (No such file or directory): give the "
     "path of a PEM file this user can read"),
    (["--registry", "https://127.0.0.1:8500", "--client-key", "/tmp/c.key"],
     "--client-key is given without --client-cert: a client certificate needs its key"),
])
def test_bad_join_tls_flags_stop_the_agent(args: list[str], message: str,
                                           tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "consulate.control.cli", "agent",
                           "--data-dir", str(tmp_path), "--no-iptables", "--no-registrator",
                           *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.endswith(f"consulate: error: {message}\n"), done.stderr
