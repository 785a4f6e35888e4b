"""The namespace lab against the real kernel: topology, isolation, teardown, CLI.

Traffic goes only to the lab's own addresses; "no route out" is checked with
``ip route get``, which sends nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest

from consulate.control import lab
from consulate.control.lab_cli import add_lab_parser

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2")

RESOLV_H2 = "nameserver 10.100.2.1\nsearch service.consul\noptions timeout:2 attempts:2\n"


def _unique_name() -> str:
    return f"consulate-t{os.urandom(3).hex()}"


def _assert_gone(name: str) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{name}-" not in netns
    assert not list(lab.NETNS_ETC.glob(f"{name}-*"))
    assert not (lab.STATE_DIR / f"{name}.json").exists()


@pytest.fixture(scope="module")
def lab2x2() -> Iterator[lab.Lab]:
    with lab.up(hosts=2, containers=2) as built:
        yield built


@pytest.fixture
def make_lab() -> Iterator[Callable[..., lab.Lab]]:
    """Build labs on demand; every one is removed after the test, pass or fail."""
    names: list[str] = []

    def make(hosts: int = 1, containers: int = 1, name: str | None = None) -> lab.Lab:
        names.append(name or _unique_name())
        return lab.up(hosts=hosts, containers=containers, name=names[-1])

    try:
        yield make
    finally:
        for name in names:
            lab.down(name)


def _out(the_lab: lab.Lab, where: str, *argv: str) -> subprocess.CompletedProcess[str]:
    proc: subprocess.CompletedProcess[str] = the_lab.exec(
        where, argv, capture_output=True, text=True, timeout=10)
    return proc


# -- shape, without namespaces ------------------------------------------------


def test_ns_maps_short_names_and_rejects_unknown_ones() -> None:
    shape = lab.Lab("consulate-abc123", hosts=2, containers=2)
    assert shape.ns("h1") == "consulate-abc123-h1"
    assert shape.ns("h2c2") == "consulate-abc123-h2c2"
    assert shape.ns("fabric") == "consulate-abc123-fabric"
    for bad in ("h9c1", "h0", "h1c3", "h1c0", "c1", "h1-c1", ""):
        with pytest.raises(ValueError, match="no place"):
            shape.ns(bad)
    assert all(n.startswith("consulate-abc123-") for n in shape.namespaces())
    assert (shape.host_ip(2), shape.bridge_ip(2), shape.container_ip(2, 1)) == (
        "10.99.0.12", "10.100.2.1", "10.100.2.11")


def test_lab_names_must_carry_the_prefix() -> None:
    with pytest.raises(ValueError, match="must start with 'consulate-'"):
        lab.Lab("demo", 1, 1)
    with pytest.raises(ValueError, match="hosts=0"):
        lab.up(hosts=0)


# -- a running 2x2 lab ----------------------------------------------------------


@pytest.mark.lab
@needs_root
@pytest.mark.parametrize("target", ["10.100.1.1", "10.100.1.12", "10.100.2.12", "10.99.0.12"])
def test_container_reaches_gateway_neighbour_and_other_host(
    lab2x2: lab.Lab, target: str
) -> None:
    proc = _out(lab2x2, "h1c1", "busybox", "ping", "-c1", "-W1", target)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.lab
@needs_root
def test_no_route_out_of_the_lab(lab2x2: lab.Lab) -> None:
    for where in ("h1", "h2", "fabric"):
        proc = _out(lab2x2, where, "ip", "route", "get", "1.1.1.1")
        assert proc.returncode != 0
        assert "unreachable" in proc.stderr
        assert _out(lab2x2, where, "ip", "route", "show", "default").stdout == ""
    # A container's only way out is its host, which has no way out.
    proc = _out(lab2x2, "h2c1", "ip", "route", "get", "1.1.1.1")
    assert "via 10.100.2.1 dev eth0" in proc.stdout
    # Nothing in the root namespace is wired to the lab.
    root = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert lab2x2.name not in root


@pytest.mark.lab
@needs_root
def test_hosts_forward_and_route_to_each_other(lab2x2: lab.Lab) -> None:
    assert _out(lab2x2, "h1", "cat", "/proc/sys/net/ipv4/ip_forward").stdout == "1\n"
    routes = _out(lab2x2, "h1", "ip", "route").stdout
    assert "10.100.2.0/24 via 10.99.0.12 dev eth0" in routes
    assert "10.100.1.0/24 dev cbr0" in routes


@pytest.mark.lab
@needs_root
def test_container_resolv_conf_points_at_its_host(lab2x2: lab.Lab) -> None:
    assert _out(lab2x2, "h2c1", "cat", "/etc/resolv.conf").stdout == RESOLV_H2


@pytest.mark.lab
@needs_root
def test_state_round_trips_and_is_listed(lab2x2: lab.Lab) -> None:
    assert lab.load(lab2x2.name) == lab2x2
    assert lab2x2.name in lab.list_labs()
    with pytest.raises(lab.LabError, match="no lab named consulate-nosuchlab"):
        lab.load("consulate-nosuchlab")


# -- lifecycle --------------------------------------------------------------------


@pytest.mark.lab
@needs_root
def test_down_is_idempotent_and_stops_processes(make_lab: Callable[..., lab.Lab]) -> None:
    built = make_lab(hosts=1, containers=1)
    sleeper = built.popen("h1c1", ["sleep", "60"])
    built.down()
    assert sleeper.wait(timeout=5) == -signal.SIGTERM  # asked politely, by PID
    built.down()
    _assert_gone(built.name)


@pytest.mark.lab
@needs_root
def test_down_all_removes_a_crashed_lab_without_state(
    make_lab: Callable[..., lab.Lab],
) -> None:
    built = make_lab(hosts=1, containers=1)
    built.state_path.unlink()  # as if the run that built it died
    assert built.name in lab.list_labs()
    # Scoped to this lab: other test runs may own live labs.
    assert lab.down_all(prefix=built.name) == [built.name]
    _assert_gone(built.name)


@pytest.mark.lab
@needs_root
def test_up_refuses_an_existing_name_and_leaves_it_alone(
    make_lab: Callable[..., lab.Lab],
) -> None:
    built = make_lab(hosts=1, containers=0)
    with pytest.raises(lab.LabError, match="already exists"):
        lab.up(hosts=1, containers=0, name=built.name)
    assert sorted(lab.namespaces_of(built.name)) == sorted(built.namespaces())


@pytest.mark.lab
@needs_root
def test_failed_up_removes_what_it_built() -> None:
    name = _unique_name()
    # A directory where resolv.conf must go makes up() fail after every
    # namespace and link exists.
    blocker = lab.NETNS_ETC / f"{name}-h1c1" / "resolv.conf"
    blocker.mkdir(parents=True)
    try:
        with pytest.raises(IsADirectoryError):
            lab.up(hosts=1, containers=1, name=name)
        _assert_gone(name)
    finally:
        lab.down(name)
        shutil.rmtree(blocker.parent, ignore_errors=True)


# -- CLI --------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="consulate")
    add_lab_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *argv])
    code: int = args.func(args)
    return code


@pytest.mark.lab
@needs_root
def test_cli_up_exec_status_down(capfd: pytest.CaptureFixture[str]) -> None:
    name = _unique_name()
    try:
        assert _cli("up", "--hosts", "1", "--containers", "2", "--name", name) == 0
        out, err = capfd.readouterr()
        assert out.splitlines()[0] == name
        assert re.fullmatch(r"building a lab: 1 host\(s\) x 2 container\(s\), 4 network "
                            r"namespaces\.\.\. done \(\d+\.\d s\)\n", err), err
        assert "10.100.1.12" in out
        assert _cli("exec", name, "h1c2", "--", "sh", "-c", "ip -br addr show eth0; exit 3") == 3
        assert "10.100.1.12/24" in capfd.readouterr().out
        assert _cli("exec", name, "h1c9", "--", "true") == 1
        assert capfd.readouterr().err.startswith("consulate: error: no place 'h1c9'")
        assert _cli("status", name) == 0
        assert f"{name}-h1c1" in capfd.readouterr().out
    finally:
        assert _cli("down", name) == 0
    _assert_gone(name)
    assert _cli("status", name) == 1
    assert "consulate lab status" in capfd.readouterr().err
