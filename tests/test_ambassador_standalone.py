"""``consulate ambassador <spec>`` as a real process on loopback: bytes forwarded exactly,
a static list taken in turns, an etcd key (a real etcd) followed as it changes, and
a connection with no backend reset with one log line saying why."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from etcdproc import ETCDCTL_ENV, EtcdProcess
from netsvc import _connect_once, _handle
from procstop import stop_process

ETCD_ADDRESS = "127.44.0.1"
START_TIMEOUT = 15.0


class EchoServer:
    """netsvc's echo server on 127.0.0.1 (greeting, echo, sha256 trailer), in threads."""

    def __init__(self, ident: str) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.ident = ident
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=_handle, args=(conn, self.ident, "echo"),
                             daemon=True).start()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def echo() -> Iterator[Callable[[str], EchoServer]]:
    servers: list[EchoServer] = []

    def start(ident: str) -> EchoServer:
        servers.append(EchoServer(ident))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


class AmbassadorProcess:
    def __init__(self, spec: str, log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consulate.control.cli", "ambassador", spec,
                 "--listen", "127.0.0.1:0", "--connect-timeout", "1"],
                stdout=log, stderr=log)
        self.port = self._listening_port()

    def _listening_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"event=listen component=ambassador address=127\.0\.0\.1:(\d+)",
                              self.log())
            if found:
                return int(found.group(1))
            assert self.process.poll() is None, f"ambassador exited:\n{self.log()}"
            time.sleep(0.05)
        raise AssertionError(f"ambassador not listening after {START_TIMEOUT}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture
def ambassador(tmp_path: Path) -> Iterator[Callable[[str], AmbassadorProcess]]:
    started: list[AmbassadorProcess] = []

    def start(spec: str) -> AmbassadorProcess:
        started.append(AmbassadorProcess(spec, tmp_path / f"ambassador{len(started)}.log"))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def closed_port() -> int:
    """A loopback port nothing listens on (connects to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fetch(port: int, size: int = 1) -> dict[str, object]:
    payload = bytes((i * 7 + 3) % 251 for i in range(size))
    return _connect_once("127.0.0.1", port, payload, timeout=10)


def assert_reset(result: dict[str, object]) -> None:
    """The connection was reset before a byte came back: depending on how fast, the
    client's connect (its SO_ERROR) or its first recv reports the reset."""
    assert (result["ok"], result.get("received", 0)) == (False, 0), result
    assert str(result["error"]).split(" ", 1)[1].startswith("ConnectionResetError"), result


def until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.1)


def test_forwards_bytes_exactly(echo: Callable[[str], EchoServer],
                                ambassador: Callable[[str], AmbassadorProcess]) -> None:
    server = echo("s1")
    running = ambassador(f"127.0.0.1:{server.port}")
    result = fetch(running.port, size=4 * 1024 * 1024)
    # the greeting, the 4 MiB payload echoed byte for byte, and the server's sha256 of it
    assert (result["ok"], result["id"], result["echo_ok"], result["trailer_ok"],
            result["received"]) == (True, "s1", True, True, 3 + 4 * 1024 * 1024 + 72)


def test_static_list_takes_turns(echo: Callable[[str], EchoServer],
                                 ambassador: Callable[[str], AmbassadorProcess]) -> None:
    one, two = echo("s1"), echo("s2")
    running = ambassador(f"127.0.0.1:{one.port},127.0.0.1:{two.port}")
    assert [fetch(running.port, 100)["id"] for _ in range(4)] == ["s1", "s2", "s1", "s2"]


def test_a_backend_that_refuses_is_skipped(echo: Callable[[str], EchoServer],
                                           ambassador: Callable[[str], AmbassadorProcess]) -> None:
    up, down = echo("s1"), closed_port()
    running = ambassador(f"127.0.0.1:{down},127.0.0.1:{up.port}")
    assert [fetch(running.port, 10)["id"] for _ in range(2)] == ["s1", "s1"]
    assert f"event=connect-failed pool=127.0.0.1:{down},127.0.0.1:{up.port} " \
        f"address=127.0.0.1:{down} error='Connection refused'" in running.log()


def test_no_backend_resets_and_logs_why(ambassador: Callable[[str], AmbassadorProcess]) -> None:
    down = closed_port()
    running = ambassador(f"127.0.0.1:{down}")
    result = fetch(running.port, 10)
    assert_reset(result)
    until(lambda: "event=no-backend" in running.log())
    assert (f"event=no-backend caller=127.0.0.1 container=- port={running.port} "
            f"spec='127.0.0.1:{down}' reason=all-attempts-failed "
            f"error='1 of 127.0.0.1:{down} refused or timed out'") in running.log()


def test_a_bad_spec_is_refused_at_start() -> None:
    done = subprocess.run([sys.executable, "-m", "consulate.control.cli", "ambassador",
                           "consul://127.0.0.1:8500"], capture_output=True, text=True,
                          timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (
        1, "", "consulate: error: backend spec 'consul://127.0.0.1:8500' names no key: add "
        "one, as in consul://127.0.0.1:8500/ambassador/redis\n")


def test_a_port_in_use_is_refused_at_start() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "consulate.control.cli", "ambassador",
                               "127.0.0.1:1", "--listen", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr.splitlines()[-1]) == (
        1, f"consulate: error: the ambassador cannot listen on 127.0.0.1:{port} "
        "(Address already in use): stop what holds it, or choose another address")


def test_a_kv_store_that_does_not_answer_refuses_with_its_error(
        ambassador: Callable[[str], AmbassadorProcess]) -> None:
    down = closed_port()
    running = ambassador(f"consul://127.0.0.1:{down}/ambassador/echo")
    assert_reset(fetch(running.port, 10))
    until(lambda: "reason=kv-unavailable" in running.log())
    uri = f"consul://127.0.0.1:{down}/ambassador/echo"
    assert (f"spec='{uri}' reason=kv-unavailable error=\"{uri} is not answering "
            f"(ClientConnectorError: Cannot connect to host 127.0.0.1:{down} ssl:default "
            f"[Connect call failed ('127.0.0.1', {down})]): start the store there, or change "
            "the spec\"") in running.log()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    with EtcdProcess(tmp_path_factory.mktemp("etcd"), ETCD_ADDRESS) as running:
        yield running


def etcdctl(etcd: EtcdProcess, *args: str) -> None:
    subprocess.run(["etcdctl", "--endpoints", etcd.client_url, *args], env=ETCDCTL_ENV,
                   check=True, capture_output=True, timeout=10)


def test_an_etcd_key_is_followed(etcd: EtcdProcess, echo: Callable[[str], EchoServer],
                                 ambassador: Callable[[str], AmbassadorProcess]) -> None:
    one, two = echo("s1"), echo("s2")
    running = ambassador(f"etcd://{ETCD_ADDRESS}:2379/ambassador/echo")
    missing = fetch(running.port, 10)
    assert_reset(missing)
    until(lambda: "reason=kv-missing" in running.log())
    assert (f"spec='etcd://{ETCD_ADDRESS}:2379/ambassador/echo' reason=kv-missing "
            f"error='etcd://{ETCD_ADDRESS}:2379/ambassador/echo does not exist: write a spec "
            "there (for example 10.0.0.5:80,10.0.0.6:80 or a service name)'") in running.log()

    etcdctl(etcd, "put", "/ambassador/echo", f"127.0.0.1:{one.port}")
    until(lambda: fetch(running.port, 10)["id"] == "s1")
    held = socket.create_connection(("127.0.0.1", running.port), timeout=10)
    assert held.recv(3) == b"s1\n"
    etcdctl(etcd, "put", "/ambassador/echo", f"127.0.0.1:{two.port}")
    until(lambda: fetch(running.port, 10)["id"] == "s2")
    assert [fetch(running.port, 1000)["id"] for _ in range(3)] == ["s2", "s2", "s2"]
    held.sendall(b"still here")  # a connection made before the switch stays where it was
    assert held.recv(10) == b"still here"
    held.close()
    etcdctl(etcd, "put", "/ambassador/echo", "etcd://127.0.0.1:2379/loop")
    until(lambda: fetch(running.port, 10).get("received", 0) == 0)
    assert (f"reason=bad-spec error=\"etcd://{ETCD_ADDRESS}:2379/ambassador/echo holds "
            "'etcd://127.0.0.1:2379/loop': a KV value must be host:port[,host:port...] or a "
            "service name, not another KV key\"") in running.log()


def test_an_etcd_that_stops_answering_leaves_the_last_value_in_use(
        tmp_path: Path, echo: Callable[[str], EchoServer],
        ambassador: Callable[[str], AmbassadorProcess]) -> None:
    server = echo("s1")
    with EtcdProcess(tmp_path / "etcd", "127.44.0.2") as store:
        etcdctl(store, "put", "/ambassador/echo", f"127.0.0.1:{server.port}")
        running = ambassador("etcd://127.44.0.2:2379/ambassador/echo")
        assert fetch(running.port, 10)["id"] == "s1"
    until(lambda: "event=kv-unavailable key=etcd://127.44.0.2:2379/ambassador/echo"
          in running.log())
    assert [fetch(running.port, 1000)["id"] for _ in range(2)] == ["s1", "s1"]
