"""registrator's command line: Go flag syntax, usage errors (exit 2), refused options
(exit 1), registry URIs, and the startup retries when Docker or the backend is away."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from registrator_support import facade

from consulate.control.config import AgentConfig, ConfigError
from consulate.control.registrator import flags
from consulate.control.registrator.adapters import (
    RegistryUriError,
    open_adapter,
    parse_registry_uri,
)
from consulate.control.registrator.agentmode import AgentRegistrator


def consulate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "consulate.control.cli", *args],
                          capture_output=True, text=True, timeout=60, env=env)


# -- parsing -----------------------------------------------------------------------


def test_go_flag_forms() -> None:
    options = flags.parse(["-cleanup", "--internal", "-ip", "10.0.0.5", "-resync=30",
                           "--tags=a,b", "-retry-attempts", "-1", "-useIpFromLabel", "ip",
                           "-deregister", "on-success", "consul://localhost:8500"])
    assert options == flags.Options(cleanup=True, internal=True, ip="10.0.0.5", resync=30,
                                    tags="a,b", retry_attempts=-1, use_ip_from_label="ip",
                                    deregister="on-success", uri="consul://localhost:8500")


def test_later_flags_win_and_booleans_take_values() -> None:
    options = flags.parse(["-cleanup", "-cleanup=false", "-explicit=T", "-ttl", "5",
                           "-ttl=0x10", "etcd://"])
    assert (options.cleanup, options.explicit, options.ttl) == (False, True, 16)


def test_double_dash_ends_the_flags() -> None:
    assert flags.parse(["-internal", "--", "-odd-uri"]).uri == "-odd-uri"


@pytest.mark.parametrize(("argv", "message"), [
    ([], "Missing required argument for registry URI."),
    (["consul://", "etcd://"], "Extra unparsed arguments:\n  etcd://\n"
                               "Options should come before the registry URI argument."),
    (["consul://", "-cleanup"], "Extra unparsed arguments:\n  -cleanup\n"
                                "Options should come before the registry URI argument."),
    (["-nope", "consul://"], "flag provided but not defined: -nope"),
    (["-ip"], "flag needs an argument: -ip"),
    (["-resync", "soon", "consul://"], 'invalid value "soon" for flag -resync: parse error'),
    (["-cleanup=maybe", "consul://"], 'invalid boolean value "maybe" for -cleanup: parse error'),
])
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(flags.UsageError) as caught:
        flags.parse(argv)
    assert str(caught.value) == message


@pytest.mark.parametrize(("argv", "message"), [
    (["-deregister", "never"], '-deregister must be "always" or "on-success"'),
    (["-ttl", "30"], "-ttl and -ttl-refresh must be specified together or not at all"),
    (["-ttl-refresh", "10"], "-ttl and -ttl-refresh must be specified together or not at all"),
    (["-ttl", "10", "-ttl-refresh", "10"], "-ttl must be greater than -ttl-refresh"),
    (["-retry-interval", "0"], "-retry-interval must be greater than 0"),
])
def test_refused_options(argv: list[str], message: str) -> None:
    with pytest.raises(flags.InvalidOptions, match=f"^{message}$"):
        flags.parse([*argv, "consul://"]).validate()


def test_ttl_with_a_shorter_refresh_is_valid() -> None:
    flags.parse(["-ttl", "30", "-ttl-refresh", "10", "consul://"]).validate()


def test_usage_lists_every_flag_with_its_default() -> None:
    text = flags.usage()
    for flag in ("-cleanup\n", "-deregister string\n", "-explicit\n", "-internal\n",
                 "-ip string\n", "-resync int\n", "-retry-attempts int\n",
                 "-retry-interval int\n", "-tags string\n", "-ttl int\n", "-ttl-refresh int\n",
                 "-useIpFromLabel string\n"):
        assert f"  {flag}" in text
    assert '(default "always")' in text and "(default 2000)" in text


# -- inside the agent ---------------------------------------------------------------


def test_the_agent_registers_into_itself_with_cleanup_and_resync() -> None:
    options = AgentRegistrator(AgentConfig(advertise="10.0.0.5",
                                           http_addr=("0.0.0.0", 18500))).options
    assert (options.uri, options.cleanup, options.resync, options.ip,
            options.retry_attempts) == ("consulate://127.0.0.1:18500", True, 30, "10.0.0.5", -1)


def test_registrator_flags_override_the_agents_defaults() -> None:
    options = AgentRegistrator(AgentConfig(
        registrator_flags="-cleanup=false -internal -tags 'a b'")).options
    assert (options.cleanup, options.internal, options.tags) == (False, True, "a b")


@pytest.mark.parametrize(("text", "message"), [
    ("-bogus", "flag provided but not defined: -bogus"),
    ("-ttl 5", "-ttl and -ttl-refresh must be specified together or not at all"),
    ("consul://x", "unexpected argument 'consul://x'"),
])
def test_bad_registrator_flags_stop_the_agent_first(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"--registrator-flags '{text}': {message}"):
        AgentRegistrator(AgentConfig(registrator_flags=text))


# -- registry URIs -------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "where"), [
    ("consul://", ("consul", "127.0.0.1", 8500, "")),
    ("consulate://10.0.0.5:18500", ("consulate", "10.0.0.5", 18500, "")),
    ("consulkv://localhost/services", ("consulkv", "localhost", 8500, "/services")),
    ("etcd://127.0.0.9/prefix", ("etcd", "127.0.0.9", 2379, "/prefix")),
    ("skydns2://127.0.0.9:4001/cluster.local", ("skydns2", "127.0.0.9", 4001,
                                                "/cluster.local")),
    ("zookeeper://zk/basepath", ("zookeeper", "zk", 2181, "/basepath")),
])
def test_registry_uri_defaults(uri: str, where: tuple[str, str, int, str]) -> None:
    parsed = parse_registry_uri(uri)
    assert (parsed.scheme, parsed.host, parsed.port, parsed.path) == where


@pytest.mark.parametrize(("uri", "message"), [
    ("redis://localhost", "unrecognized adapter: redis://localhost"),
    ("localhost:8500", "unrecognized adapter: localhost:8500"),
    ("consul://localhost:99999", "bad adapter uri: consul://localhost:99999"),
    ("skydns2://127.0.0.1:2379", "skydns2 needs a DNS domain"),
])
def test_bad_registry_uris(uri: str, message: str) -> None:
    with pytest.raises(RegistryUriError, match=message):
        open_adapter(uri, "h")


# -- the command's exit statuses -------------------------------------------------------


def test_no_uri_prints_usage_and_exits_2() -> None:
    done = consulate("registrator")
    assert done.returncode == 2
    assert done.stderr.startswith("Missing required argument for registry URI.\n\n"
                                  "Usage of consulate registrator:\n")


def test_two_uris_exit_2() -> None:
    done = consulate("registrator", "consul://", "etcd://")
    assert done.returncode == 2
    assert "Extra unparsed arguments:\n  etcd://\n" in done.stderr


def test_help_exits_0() -> None:
    done = consulate("registrator", "-h")
    assert (done.returncode, done.stderr) == (0, flags.usage())


def test_unknown_adapter_exits_2() -> None:
    done = consulate("registrator", "redis://localhost:6379")
    assert done.returncode == 2
    assert done.stderr == "consulate: error: unrecognized adapter: redis://localhost:6379\n"


def test_refused_options_exit_1() -> None:
    done = consulate("registrator", "-ttl", "5", "-ttl-refresh", "10", "consul://")
    assert (done.returncode, done.stderr) == (
        1, "consulate: error: -ttl must be greater than -ttl-refresh\n")


def test_backend_down_is_retried_then_exits_1() -> None:
    done = consulate("registrator", "-retry-attempts", "2", "-retry-interval", "50",
                     "consul://127.0.0.1:1")
    assert done.returncode == 1
    assert [line.split(": ", 1)[1] for line in done.stderr.splitlines()
            if "Connecting to backend" in line] == [
        "Connecting to backend (0/2)", "Connecting to backend (1/2)",
        "Connecting to backend (2/2)"]
    assert done.stderr.splitlines()[-1] == (
        "consulate: error: Consul at http://127.0.0.1:1 is not answering (ClientConnectorError:"
        " Cannot connect to host 127.0.0.1:1 ssl:default [Connect call failed ('127.0.0.1', 1)]"
        "): start it or fix the registry URI")


async def test_docker_down_is_retried_then_exits_1(tmp_path: Path) -> None:
    missing = tmp_path / "no-docker.sock"
    async with facade(tmp_path) as store:  # the backend answers: Docker is what is missing
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "consulate.control.cli", "registrator", "-retry-attempts",
            "1", "-retry-interval", "50", f"consul://{store.address}",
            env={"DOCKER_HOST": f"unix://{missing}", "PATH": "/usr/bin:/bin"},
            stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    lines = stderr.decode().splitlines()
    assert proc.returncode == 1
    assert sum(f"Connecting to Docker at unix://{missing}" in line for line in lines) == 2
    assert lines[-1].startswith(f"consulate: error: Docker at unix://{missing} is not "
                                "answering (")
    assert lines[-1].endswith("start dockerd, or point DOCKER_HOST (--docker-host) at its "
                              "socket")
