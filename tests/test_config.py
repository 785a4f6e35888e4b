"""The agent's DNS options: flags and CONSULATE_* variables -> DnsConfig, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from consulate.control import cli
from consulate.control.config import (
    AgentConfig,
    ConfigError,
    parse_node_meta,
    parse_recursor,
    parse_seconds,
    parse_service_ttl,
)
from consulate.dns.config import SoaTimers


def config_of(*argv: str) -> AgentConfig:
    args = cli.build_parser().parse_args(["agent", *argv])
    config = cli._agent_config(args)
    config.validate()
    return config


def test_defaults_are_consuls() -> None:
    dns = config_of().dns_config()
    assert (dns.domain, dns.alt_domain, dns.a_records, dns.udp_max, dns.node_ttl) == (
        "consul.", None, "vip", 1232, 0)
    assert dns.soa == SoaTimers(refresh=3600, retry=600, expire=86400, min_ttl=0)
    assert (dns.recursors, dns.recursor_timeout) == ((), 2.0)
    assert dns.service_ttl.ttl_for("web") == 0 and dict(dns.node_meta) == {}


def test_every_dns_flag_reaches_the_responder_config() -> None:
    dns = config_of(
        "--domain", "Mesh.Example", "--alt-domain", "consul", "--dns-a", "instances",
        "--udp-max", "1400", "--recursor", "127.0.0.53", "--recursor", "10.0.0.2:5353",
        "--recursor-timeout", "0.5", "--service-ttl", "web=30", "--service-ttl", "api-*=1m",
        "--service-ttl", "*=5s", "--node-ttl", "10", "--dns-soa-refresh", "1h",
        "--dns-soa-retry", "60", "--dns-soa-expire", "7200", "--dns-soa-min-ttl", "15s",
        "--node-meta", "rack=r1", "--node-meta", "zone=a=b", "--advertise", "10.1.2.3",
        "--node", "n1", "--datacenter", "west",
    ).dns_config()
    assert (dns.domain, dns.alt_domain, dns.zones) == ("mesh.example.", "consul.",
                                                       ("mesh.example.", "consul."))
    assert (dns.a_records, dns.udp_max, dns.node_ttl) == ("instances", 1400, 10)
    assert dns.recursors == (("127.0.0.53", 53), ("10.0.0.2", 5353))
    assert dns.recursor_timeout == 0.5
    assert [dns.service_ttl.ttl_for(n) for n in ("web", "api-x", "db")] == [30, 60, 5]
    assert dns.soa == SoaTimers(refresh=3600, retry=60, expire=7200, min_ttl=15)
    assert dict(dns.node_meta) == {"rack": "r1", "zone": "a=b"}
    assert (dns.node, dns.node_address, dns.datacenter) == ("n1", "10.1.2.3", "west")


def test_repeatable_flags_come_from_comma_separated_variables(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSULATE_RECURSOR", "127.0.0.53,127.0.0.54:5300")
    monkeypatch.setenv("CONSULATE_SERVICE_TTL", "web=3")
    monkeypatch.setenv("CONSULATE_NODE_META", "rack=r1,zone=a")
    monkeypatch.setenv("CONSULATE_UDP_MAX", "4096")
    dns = config_of().dns_config()
    assert dns.recursors == (("127.0.0.53", 53), ("127.0.0.54", 5300))
    assert dns.service_ttl.ttl_for("web") == 3
    assert dict(dns.node_meta) == {"rack": "r1", "zone": "a"}
    assert dns.udp_max == 4096
    # flags replace the variable, they do not add to it
    assert config_of("--recursor", "127.0.0.9").dns_config().recursors == (("127.0.0.9", 53),)


@pytest.mark.parametrize(("argv", "message"), [
    (["--domain", "bad domain"], "--domain 'bad domain' is not a DNS domain: use labels of "
     "letters, digits, '-' or '_' separated by dots (for example consul.)"),
    (["--domain", "."], "--domain '.' is not a DNS domain"),
    (["--alt-domain", "a..b"], "--alt-domain 'a..b' is not a DNS domain"),
    (["--alt-domain", "CONSUL"], "--alt-domain 'consul.' is the same as --domain: give "
     "another domain or leave it out"),
    (["--datacenter", "dc.1"], "--datacenter 'dc.1' must be one DNS label: lowercase "
     "letters, digits, '-' or '_' (for example dc1)"),
    (["--dns-a", "all"], "--dns-a 'all' is unknown: use vip (answer a service's virtual IP) "
     "or instances (its instance addresses)"),
    (["--udp-max", "511"], "--udp-max 511 must be from 512 to 4096 bytes (default 1232)"),
    (["--udp-max", "9000"], "--udp-max 9000 must be from 512 to 4096 bytes (default 1232)"),
    (["--recursor-timeout", "0"], "--recursor-timeout 0.0 must be above 0"),
    (["--node-ttl", "3000000000"], "--node-ttl 3000000000 must be from 0 to 2147483647 "
     "seconds"),
    (["--service-ttl", "web=2147483648"], "--service-ttl web 2147483648 must be from 0 to "
     "2147483647 seconds"),
    # found by make fuzz: digits that str.isdigit() takes and int() refuses
    (["--http-addr", "127.0.0.1:\u00b2"], "--http-addr '127.0.0.1:\u00b2' is not HOST:PORT"),
    (["--service-ttl", "web=\u00b2"], "--service-ttl web '\u00b2' is not a number of whole "
     "seconds"),
])
def test_bad_values_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_of(*argv)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(("text", "message"), [
    ("localhost", "--recursor 'localhost' is not ADDR[:PORT] with an IPv4 address "
     "(for example 127.0.0.53 or 10.0.0.2:5353)"),
    ("127.0.0.1:0", "--recursor '127.0.0.1:0' is not ADDR[:PORT]"),
    ("127.0.0.1:99999", "--recursor '127.0.0.1:99999' is not ADDR[:PORT]"),
    ("127.0.0.1:x", "--recursor '127.0.0.1:x' is not ADDR[:PORT]"),
    ("127.0.0.1:\u2070", "--recursor '127.0.0.1:\u2070' is not ADDR[:PORT]"),
])
def test_bad_recursors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_recursor(text)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(("text", "message"), [
    ("web", "--service-ttl 'web' is not NAME=SECONDS, where NAME is a service name, a prefix "
     "ending with '*', or '*' (for example web=30 or api-*=5s)"),
    ("w*b=3", "--service-ttl 'w*b=3' is not NAME=SECONDS"),
    ("=3", "--service-ttl '=3' is not NAME=SECONDS"),
    ("web=-1", "--service-ttl web '-1' is not a number of whole seconds (for example 30 "
     "or 30s)"),
    ("web=1.5s", "--service-ttl web '1.5s' is not a number of whole seconds"),
    ("web=soon", "--service-ttl web 'soon' is not a number of whole seconds"),
])
def test_bad_service_ttls(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_service_ttl(text)
    assert str(raised.value).startswith(message)


def test_seconds_take_numbers_and_durations() -> None:
    assert [parse_seconds("--x", t) for t in ("0", "30", "30s", "1m30s", "2h")] == [
        0, 30, 30, 90, 7200]


@pytest.mark.parametrize(("text", "message"), [
    ("rack", "--node-meta 'rack' is not KEY=VALUE with a key of up to 128 letters, digits, "
     "'-' or '_'"),
    ("ra ck=1", "--node-meta 'ra ck=1' is not KEY=VALUE"),
    ("k=" + "v" * 300, "--node-meta k=...: the pair is 302 bytes; a DNS TXT string holds at "
     "most 255"),
])
def test_bad_node_meta(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_node_meta(text)
    assert str(raised.value).startswith(message)


def test_the_cli_prints_a_bad_value_as_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["agent", "--data-dir", str(tmp_path), "--udp-max", "100"])
    assert code == 1
    assert capsys.readouterr().err == (
        "consulate: error: --udp-max 100 must be from 512 to 4096 bytes (default 1232)\n")
    assert cli.main(["agent", "--recursor", "nope"]) == 1
    assert capsys.readouterr().err.startswith("consulate: error: --recursor 'nope' is not")
