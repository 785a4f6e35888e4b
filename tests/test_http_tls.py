"""TLS for the HTTP API, with real handshakes against a real agent: the agent runs
in a lab host with ``--tls-cert/--tls-key/--tls-ca`` and ``--token``, listening
beyond loopback; the clients (consulate's CLI, and Python's ssl for raw checks)
run in a lab container and reach it at the host's bridge address. Certificates
come from the openssl CLI, made fresh for the module.

Also here: the startup errors for unusable certificate files, and the check that
no token reaches the agent's log.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from labpki import Pki, issue, new_ca

from consulate.control import lab as labmod
from consulate.control.procstop import stop_process
from consulate.control.tls import ServerTls, TlsError, client_context, server_tls

pytestmark = pytest.mark.lab

TOKEN = "tls-test-token-7f3a9c"
AGENT_START_TIMEOUT = 60.0
CONTAINER = "h1c1"


@pytest.fixture(scope="module")
def lab() -> Iterator[labmod.Lab]:
    with labmod.up(hosts=1, containers=1) as built:
        yield built


@pytest.fixture(scope="module")
def pki(lab: labmod.Lab, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    work = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        new_ca(ca, work)
    agent_ip = lab.bridge_ip(1)
    for name, ca, usage in (("agent", "ca", f"serverAuth\nsubjectAltName=IP:{agent_ip}"),
                            ("client", "ca", "clientAuth"),
                            ("rogue-client", "rogue-ca", "clientAuth")):
        issue(name, ca, f"extendedKeyUsage={usage}\n", work)
    return Pki(work)


@dataclass
class TlsAgent:
    lab: labmod.Lab
    url: str
    log_path: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``consulate ARGS`` run in the lab container."""
        done: subprocess.CompletedProcess[str] = self.lab.exec(
            CONTAINER, [sys.executable, "-m", "consulate.control.cli", *args],
            capture_output=True, text=True, timeout=60)
        return done

    def https(self, method: str, path: str, files: tuple[str, str, str], *,
              headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, bytes]:
        """One raw request from the container with Python's ssl: (status, body); an
        SSL failure is raised as RuntimeError with its text."""
        script = (
            "import json,ssl,sys,urllib.request as u,urllib.error as e\n"
            "a=json.loads(sys.argv[1])\n"
            "c=ssl.create_default_context(cafile=a['ca'])\n"
            "a['cert'] and c.load_cert_chain(a['cert'],a['key'])\n"
            "r=u.Request(a['url'],data=a['body'].encode() or None,method=a['method'],"
            "headers=a['headers'])\n"
            "try:\n"
            " with u.urlopen(r,context=c,timeout=10) as x: s,b=x.status,x.read()\n"
            "except e.HTTPError as x: s,b=x.code,x.read()\n"
            "sys.stdout.write(json.dumps([s,b.decode()]))\n"
        )
        ca, cert, key = files  # the CA file, the client's certificate and key
        request = {"url": self.url + path, "method": method, "ca": ca, "cert": cert,
                   "key": key, "headers": headers or {}, "body": body.decode()}
        done = self.lab.exec(CONTAINER, [sys.executable, "-c", script, json.dumps(request)],
                             capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        status, text = json.loads(done.stdout)
        return int(status), text.encode()


@pytest.fixture(scope="module")
def agent(lab: labmod.Lab, pki: Pki,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsAgent]:
    work = tmp_path_factory.mktemp("tls-agent")
    log_path = work / "agent.log"
    with log_path.open("wb") as log:
        url = f"https://{lab.bridge_ip(1)}:8500"
        process = lab.popen("h1", [
            sys.executable, "-m", "consulate.control.cli", "--log-level", "debug", "agent",
            "--data-dir", str(work / "data"), "--node", "h1", "--no-iptables",
            "--no-registrator", "--advertise", lab.bridge_ip(1),
            "--http-addr", "0.0.0.0:8500", "--token", TOKEN,
            "--tls-cert", pki["agent.pem"], "--tls-key", pki["agent.key"],
            "--tls-ca", pki["ca.pem"]], stdout=log, stderr=log)
        try:
            tls_agent = TlsAgent(lab, url, log_path)
            _wait_listening(tls_agent, process)
            yield tls_agent
        finally:
            stop_process(process)


def _wait_listening(agent: TlsAgent, process: subprocess.Popen[bytes]) -> None:
    """Until the log says the HTTP API listens (the agent exiting fails at once)."""
    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"agent exited with {process.returncode}:\n"
                                 f"{agent.log_path.read_text()}")
        if "event=listen component=http" in agent.log_path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"agent not listening after {AGENT_START_TIMEOUT}s:\n"
                         f"{agent.log_path.read_text()}")


def _connection_flags(agent: TlsAgent, pki: Pki, *, cert: str = "client") -> list[str]:
    return ["--http-addr", agent.url, "--ca-file", pki["ca.pem"],
            "--client-cert", pki[f"{cert}.pem"], "--client-key", pki[f"{cert}.key"]]


def test_the_cli_registers_and_lists_over_https_with_a_client_certificate(
        agent: TlsAgent, pki: Pki) -> None:
    done = agent.cli("register", "web", "10.100.1.10:80", "--id", "web-1",
                     "--token", TOKEN, *_connection_flags(agent, pki))
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "registered web-1 (web at 10.100.1.10:80)\n", "")
    done = agent.cli("services", "--json", *_connection_flags(agent, pki))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"service": "web", "id": "web-1",
                                        "address": "10.100.1.10", "port": 80, "tags": []}]


def test_a_write_without_the_token_is_refused_over_tls(agent: TlsAgent, pki: Pki) -> None:
    done = agent.cli("register", "db", "10.100.1.10:5432", *_connection_flags(agent, pki))
    assert done.returncode == 1
    assert done.stderr == (
        "consulate: error: PUT /v1/agent/service/register: 403 Permission denied: this "
        "write needs the agent's token (send it as X-Consul-Token or Authorization: "
        "Bearer) (consulate: pass --token or set CONSULATE_TOKEN)\n")


def test_kv_reads_need_the_token_when_the_api_listens_beyond_loopback(
        agent: TlsAgent, pki: Pki) -> None:
    client = (pki["ca.pem"], pki["client.pem"], pki["client.key"])
    assert agent.https("PUT", "/v1/kv/db/password", client, body=b"hunter2",
                       headers={"X-Consul-Token": TOKEN}) == (200, b"true")
    denied = (403, b"Permission denied: reading KV needs the agent's token when the API "
                   b"listens beyond loopback (send it as X-Consul-Token or Authorization: "
                   b"Bearer)")
    assert agent.https("GET", "/v1/kv/db/password?raw", client) == denied
    assert agent.https("GET", "/v1/kv/db/password?raw", client,
                       headers={"X-Consul-Token": "nope"}) == denied
    assert agent.https("GET", "/v1/kv/db/password?raw", client,
                       headers={"Authorization": f"Bearer {TOKEN}"}) == (200, b"hunter2")
    status, _ = agent.https("GET", "/v1/catalog/services", client)  # other reads: open
    assert status == 200


@pytest.mark.parametrize("cert", ["", "rogue-client"])
def test_a_client_without_a_certificate_from_the_ca_is_rejected(
        agent: TlsAgent, pki: Pki, cert: str) -> None:
    """The agent hangs up (TLS 1.3 sends its alert after the client's handshake
    ended, so the client sees the alert or just the close): no answer, nothing
    written."""
    flags = ["--http-addr", agent.url, "--ca-file", pki["ca.pem"]]
    if cert:
        flags += ["--client-cert", pki[f"{cert}.pem"], "--client-key", pki[f"{cert}.key"]]
    done = agent.cli("register", "rogue", "10.100.1.10:1", "--token", TOKEN, *flags)
    assert done.returncode == 1
    assert done.stderr.startswith(f"consulate: error: TLS with the agent at {agent.url} "
                                  "failed (")
    assert done.stderr.endswith("pass --ca-file with the CA that signed the agent's "
                                "certificate, and --client-cert and --client-key if the "
                                "agent verifies clients (--tls-ca)\n")
    done = agent.cli("services", "--json", *_connection_flags(agent, pki))
    assert "rogue" not in done.stdout


def test_an_agent_certificate_from_another_ca_is_not_trusted(agent: TlsAgent,
                                                             pki: Pki) -> None:
    done = agent.cli("services", "--http-addr", agent.url, "--ca-file", pki["rogue-ca.pem"],
                     "--client-cert", pki["client.pem"], "--client-key", pki["client.key"])
    assert done.returncode == 1
    assert "TLS with the agent at" in done.stderr
    assert "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed" in done.stderr


def test_plain_http_to_the_tls_agent_says_to_use_https(agent: TlsAgent) -> None:
    address = agent.url.removeprefix("https://")
    done = agent.cli("services", "--http-addr", address)
    assert done.returncode == 1
    assert done.stderr.startswith(f"consulate: error: the agent at http://{address} closed "
                                  "the connection without an answer (")
    assert done.stderr.endswith("if it serves TLS (--tls-cert), use an https:// address\n")


def test_no_token_reaches_the_log(agent: TlsAgent, pki: Pki) -> None:
    """Every way a token can come, right and wrong, in good and malformed requests:
    the agent's log (at debug level) holds none of them."""
    client = (pki["ca.pem"], pki["client.pem"], pki["client.key"])
    wrong = "wrong-token-5d1e"
    for headers in ({"X-Consul-Token": TOKEN}, {"Authorization": f"Bearer {TOKEN}"},
                    {"X-Consul-Token": wrong}, {"Authorization": f"Bearer {wrong}"}):
        agent.https("PUT", "/v1/kv/k", client, headers=headers, body=b"v")
        agent.https("GET", f"/v1/kv/k?token={TOKEN}", client, headers=headers)
        agent.https("PUT", "/v1/agent/service/register", client, headers=headers,
                    body=b"{bad")
    status, body = agent.https("GET", "/v1/kv/k", client, headers={
        "X-Consul-Token": TOKEN + "x" * 9000})
    assert status == 431
    assert TOKEN.encode() not in body
    log = agent.log_path.read_text()
    assert "event=http-bad-request" in log  # the oversized header was logged, without it
    assert TOKEN not in log
    assert wrong not in log


# -- startup errors -------------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    ({"cert": "agent.pem"}, "--tls-cert is given without --tls-key: the API serves TLS "
                            "with both"),
    ({"key": "agent.key"}, "--tls-key is given without --tls-cert"),
    ({"ca": "ca.pem"}, "checks client certificates, which needs TLS: also give --tls-cert "
                       "and --tls-key"),
])
def test_incomplete_tls_flags_say_what_is_missing(pki: Pki, flags: dict[str, str],
                                                  message: str) -> None:
    paths = {name: pki[file] for name, file in flags.items()}
    with pytest.raises(TlsError, match=message):
        server_tls(paths.get("cert", ""), paths.get("key", ""), paths.get("ca", ""))


@pytest.mark.parametrize(("cert", "key", "ca", "message"), [
    ("missing.pem", "agent.key", "", "--tls-cert '{dir}/missing.pem' cannot be read "
     "(No such file or directory): give the path of a PEM file this user can read"),
    ("agent.pem", "client.key", "", "--tls-key '{dir}/client.key' is not the key of the "
     "certificate in --tls-cert '{dir}/agent.pem': give the key the certificate was "
     "issued for"),
    ("agent.csr", "agent.key", "", "--tls-cert '{dir}/agent.csr' / --tls-key "
     "'{dir}/agent.key': not a PEM certificate and its unencrypted private key"),
    ("agent.pem", "agent.key", "agent.key", "--tls-ca '{dir}/agent.key' holds no PEM CA "
     "certificate"),
])
def test_unusable_files_are_refused_with_the_flag_and_the_fix(
        pki: Pki, cert: str, key: str, ca: str, message: str) -> None:
    settings = ServerTls(pki[cert], pki[key], pki[ca] if ca else "")
    with pytest.raises(TlsError) as raised:
        settings.context()
    assert str(raised.value).startswith(message.format(dir=pki.dir))


def test_a_client_certificate_needs_its_key(pki: Pki) -> None:
    with pytest.raises(TlsError, match="--client-cert is given without --client-key"):
        client_context(pki["ca.pem"], pki["client.pem"], "")


def test_the_agent_exits_1_naming_the_unusable_file(pki: Pki, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "consulate.control.cli", "agent", "--no-iptables",
         "--no-registrator", "--data-dir", str(tmp_path), "--http-addr", "127.0.0.1:0",
         "--dns-addr", "127.0.0.1:0", "--proxy-addr", "127.0.0.1:0",
         "--tls-cert", pki["agent.pem"], "--tls-key", str(tmp_path / "nope.key")],
        capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.endswith(
        f"consulate: error: --tls-key '{tmp_path}/nope.key' cannot be read (No such file "
        "or directory): give the path of a PEM file this user can read\n")


def test_server_context_requires_client_certificates_only_with_a_ca(pki: Pki) -> None:
    assert ServerTls(pki["agent.pem"], pki["agent.key"]).context().verify_mode == \
        ssl.CERT_NONE
    assert ServerTls(pki["agent.pem"], pki["agent.key"], pki["ca.pem"]).context() \
        .verify_mode == ssl.CERT_REQUIRED
