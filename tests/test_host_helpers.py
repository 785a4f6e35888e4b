"""`consulate docker-opts` and `consulate iptables --print`: exact output, clear errors."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from consulate.control import lab as labmod
from consulate.control.config import ConfigError
from consulate.control.host_helpers import docker_dns_options, redirect_rules_text
from consulate.proxy.iptables import RedirectRules, install_script

CLI = [sys.executable, "-m", "consulate.control.cli"]


def test_iptables_print_is_the_agents_transaction() -> None:
    """What --print shows is the agent's own restore transaction on a host without its
    rules (tests/test_iptables_plan.py checks that transaction line by line)."""
    assert redirect_rules_text("240.0.0.0/4", 10000, "0xc0a") == install_script(
        RedirectRules("240.0.0.0/4", 10000, 0xC0A), "")


def test_iptables_print_with_sk_lookup_leaves_tcp_out() -> None:
    printed = subprocess.run([*CLI, "iptables", "--print", "--tcp-intercept", "sk-lookup"],
                             capture_output=True, text=True, check=True).stdout
    assert printed == install_script(RedirectRules("240.0.0.0/4", 10000, 0xC0A, tcp=False), "")
    assert "-p tcp" not in printed and "-p udp -j CONSULATE-UDP" in printed


@pytest.mark.parametrize(("args", "message"), [
    (("10.0.0.0/33", 10000, "0xc0a"), "--vip-cidr '10.0.0.0/33' is not an IPv4 network"),
    (("240.0.0.0/4", 0, "0xc0a"), "--proxy-port 0 must be from 1 to 65535"),
    (("240.0.0.0/4", 10000, "zero"), "--mark 'zero' must be a number"),
])
def test_iptables_print_refuses_bad_values(args: tuple[str, int, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        redirect_rules_text(*args)


def test_docker_opts_name_the_bridge_and_the_search_domain() -> None:
    assert docker_dns_options("172.17.0.1", "consul.") == (
        "--dns 172.17.0.1 --dns-search service.consul")
    assert docker_dns_options("10.1.0.1", "mesh.example.") == (
        "--dns 10.1.0.1 --dns-search service.mesh.example")
    with pytest.raises(ConfigError, match="--bridge-ip 'docker0' is not an IPv4 address"):
        docker_dns_options("docker0", "consul.")


@pytest.fixture
def host() -> Iterator[labmod.Lab]:
    with labmod.up(hosts=1, containers=0) as lab:
        yield lab


@pytest.mark.lab
def test_docker_opts_find_docker0_on_the_host(host: labmod.Lab) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return host.exec("h1", [*CLI, "docker-opts"], capture_output=True, text=True)

    missing = run()
    assert missing.returncode == 1
    assert "no docker0 bridge with an IPv4 address here" in missing.stderr
    host.exec("h1", ["ip", "link", "add", "docker0", "type", "bridge"], check=True)
    host.exec("h1", ["ip", "addr", "add", "172.30.0.1/16", "dev", "docker0"], check=True)
    found = run()
    assert (found.returncode, found.stdout) == (0, "--dns 172.30.0.1 --dns-search service.consul\n")
