"""Ambassador specs, container rules, the caller cache and static round robin (pure, no
I/O), and the omni-mode iptables rule as `consulate iptables --print` shows it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from consulate.control.config import AgentConfig, ConfigError
from consulate.proxy.ambassador_callers import Cached, Caller, CallerCache, caller_of
from consulate.proxy.ambassador_spec import (
    BadSpec,
    KvSpec,
    Rules,
    ServiceSpec,
    StaticSpec,
    Target,
    container_rules,
    parse_kv_value,
    parse_spec,
)
from consulate.proxy.pool import ServicePool

FORMS = ("host:port[,host:port...], a service name, consul://HOST:PORT/KEY or "
         "etcd://HOST:PORT[,HOST:PORT...]/KEY")


@pytest.mark.parametrize(("text", "spec"), [
    ("10.0.0.5:6379", StaticSpec((Target("10.0.0.5", 6379),))),
    ("10.0.0.5:80, 10.0.0.6:81", StaticSpec((Target("10.0.0.5", 80), Target("10.0.0.6", 81)))),
    ("redis.internal:6379", StaticSpec((Target("redis.internal", 6379),))),
    ("web", ServiceSpec("web")),
    (" api_v2.eu ", ServiceSpec("api_v2.eu")),
    ("consul://127.0.0.1:8500/ambassador/redis",
     KvSpec("consul", (("127.0.0.1", 8500),), "ambassador/redis")),
    ("etcd://10.0.0.1:2379,10.0.0.2:2379/ambassador/redis/",
     KvSpec("etcd", (("10.0.0.1", 2379), ("10.0.0.2", 2379)), "/ambassador/redis")),
])
def test_each_form_parses(text: str, spec: object) -> None:
    assert parse_spec(text) == spec


def test_kv_spec_uri_names_the_key_as_given() -> None:
    assert parse_spec("etcd://10.0.0.1:2379/a/b").uri == "etcd://10.0.0.1:2379/a/b"  # type: ignore[union-attr]


@pytest.mark.parametrize(("text", "message"), [
    ("", f"backend spec '' is empty: give {FORMS}"),
    ("   ", f"backend spec '   ' is empty: give {FORMS}"),
    ("10.0.0.5", "backend spec '10.0.0.5' is an address without a port: write it as "
     "10.0.0.5:PORT"),
    ("we b", "backend spec 'we b' is not a service name (letters, digits, '-', '_' and '.', "
     f"up to 128) nor any of {FORMS}"),
    ("10.0.0.5:", "backend spec '10.0.0.5:': '10.0.0.5:' is not host:port with a port from 1 "
     "to 65535 (for example 10.0.0.5:6379)"),
    ("10.0.0.5:0", "backend spec '10.0.0.5:0': '10.0.0.5:0' is not host:port with a port from "
     "1 to 65535 (for example 10.0.0.5:6379)"),
    ("10.0.0.5:65536", "backend spec '10.0.0.5:65536': '10.0.0.5:65536' is not host:port with "
     "a port from 1 to 65535 (for example 10.0.0.5:6379)"),
    ("10.0.0.5:80,", "backend spec '10.0.0.5:80,': '' is not host:port with a port from 1 to "
     "65535 (for example 10.0.0.5:6379)"),
    (":80", "backend spec ':80': ':80' is not host:port with a port from 1 to 65535 "
     "(for example 10.0.0.5:6379)"),
    ("10.0.0.300:80", "backend spec '10.0.0.300:80': '10.0.0.300' is neither an IPv4 address "
     "nor a host name"),
    ("bad_host:80", "backend spec 'bad_host:80': 'bad_host' is neither an IPv4 address nor a "
     "host name"),
    ("redis://127.0.0.1:6379/x", "backend spec 'redis://127.0.0.1:6379/x': the scheme "
     "'redis://' is unknown: use consul:// or etcd://"),
    ("consul:///key", "backend spec 'consul:///key' names no HOST:PORT: write it as "
     "consul://127.0.0.1:8500/KEY"),
    ("etcd:///key", "backend spec 'etcd:///key' names no HOST:PORT: write it as "
     "etcd://127.0.0.1:2379/KEY"),
    ("consul://127.0.0.1:8500", "backend spec 'consul://127.0.0.1:8500' names no key: add "
     "one, as in consul://127.0.0.1:8500/ambassador/redis"),
    ("etcd://127.0.0.1:2379/", "backend spec 'etcd://127.0.0.1:2379/' names no key: add one, "
     "as in etcd://127.0.0.1:2379/ambassador/redis"),
    ("consul://127.0.0.1:8500/k?x=1", "backend spec 'consul://127.0.0.1:8500/k?x=1' names no "
     "key: add one, as in consul://127.0.0.1:8500/ambassador/redis"),
    ("consul://10.0.0.1:8500,10.0.0.2:8500/k", "backend spec "
     "'consul://10.0.0.1:8500,10.0.0.2:8500/k': a Consul agent is one HOST:PORT (for example "
     "consul://127.0.0.1:8500/KEY)"),
    ("etcd://127.0.0.1/k", "backend spec 'etcd://127.0.0.1/k': '127.0.0.1' is not host:port "
     "with a port from 1 to 65535 (for example 10.0.0.5:6379)"),
])
def test_each_bad_spec_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(BadSpec) as caught:
        parse_spec(text)
    assert str(caught.value) == message


def test_kv_value_holds_a_list_or_a_name() -> None:
    assert parse_kv_value(b"10.0.0.5:80,10.0.0.6:80\n", "k") == StaticSpec(
        (Target("10.0.0.5", 80), Target("10.0.0.6", 80)))
    assert parse_kv_value(b"web", "k") == ServiceSpec("web")


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "consul://127.0.0.1:8500/r is empty: write a spec such as 10.0.0.5:80,10.0.0.6:80 "
     "or a service name"),
    (b"\xff", "consul://127.0.0.1:8500/r does not hold UTF-8 text: write a spec such as "
     "10.0.0.5:80,10.0.0.6:80 or a service name"),
    (b"etcd://127.0.0.1:2379/other", "consul://127.0.0.1:8500/r holds "
     "'etcd://127.0.0.1:2379/other': a KV value must be host:port[,host:port...] or a "
     "service name, not another KV key"),
    (b"10.0.0.5:x", "backend spec '10.0.0.5:x': '10.0.0.5:x' is not host:port with a port "
     "from 1 to 65535 (for example 10.0.0.5:6379)"),
])
def test_bad_kv_values(raw: bytes, message: str) -> None:
    with pytest.raises(BadSpec) as caught:
        parse_kv_value(raw, "consul://127.0.0.1:8500/r")
    assert str(caught.value) == message


def test_container_rules_from_env_and_labels_label_wins() -> None:
    rules = container_rules(
        ["PATH=/bin", "BACKEND_6379=10.0.0.5:6379", "BACKEND_80=old", "BACKEND_x=web",
         "BACKEND_70000=web"],
        {"connect.80": "web", "connect.": "web", "other": "x"})
    assert rules == Rules(
        {6379: "10.0.0.5:6379", 80: "web"},
        ("variable BACKEND_x: 'x' is not a port from 1 to 65535 (write BACKEND_6379=... or "
         "connect.6379=...)",
         "variable BACKEND_70000: '70000' is not a port from 1 to 65535 (write "
         "BACKEND_6379=... or connect.6379=...)",
         "label connect.: '' is not a port from 1 to 65535 (write BACKEND_6379=... or "
         "connect.6379=...)"))


def _inspect(running: bool = True) -> dict[str, object]:
    return {"Id": "abc123", "Name": "/app", "State": {"Running": running},
            "Config": {"Env": ["BACKEND_6379=redis"], "Labels": {"connect.80": "web"}},
            "NetworkSettings": {"IPAddress": "172.17.0.2",
                                "Networks": {"bridge": {"IPAddress": "172.17.0.2"},
                                             "back": {"IPAddress": "10.5.0.3"}}}}


def test_caller_of_reads_addresses_and_rules_from_inspect() -> None:
    assert caller_of(_inspect()) == (
        ["10.5.0.3", "172.17.0.2"],
        Caller("abc123", "app", Rules({6379: "redis", 80: "web"})))
    assert caller_of(_inspect(running=False)) is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


APP = Caller("c1", "app", Rules({6379: "redis"}))
OTHER = Caller("c2", "other", Rules({}))


def test_cache_hit_until_ttl() -> None:
    clock = Clock()
    cache = CallerCache(clock, ttl=60, miss_ttl=1)
    assert cache.get("172.17.0.2") is None  # ask Docker
    cache.put("172.17.0.2", APP)
    clock.now += 59.9
    assert cache.get("172.17.0.2") == Cached(APP)
    clock.now += 0.1
    assert cache.get("172.17.0.2") is None
    assert len(cache) == 0


def test_cache_forgets_a_container_when_it_dies() -> None:
    cache = CallerCache(Clock())
    cache.put("172.17.0.2", APP)
    cache.put("10.5.0.3", APP)
    cache.put("172.17.0.3", OTHER)
    assert cache.container_gone("c1") == ["172.17.0.2", "10.5.0.3"]
    assert cache.get("172.17.0.2") is None
    assert cache.get("10.5.0.3") is None
    assert cache.get("172.17.0.3") == Cached(OTHER)
    assert cache.container_gone("c1") == []


def test_cache_keeps_a_miss_briefly_and_drops_it_when_a_container_starts() -> None:
    clock = Clock()
    cache = CallerCache(clock, ttl=60, miss_ttl=1)
    cache.put("172.17.0.9", None)
    cache.put("172.17.0.2", APP)
    assert cache.get("172.17.0.9") == Cached(None)
    clock.now += 1
    assert cache.get("172.17.0.9") is None
    cache.put("172.17.0.9", None)
    cache.container_started()
    assert cache.get("172.17.0.9") is None
    assert cache.get("172.17.0.2") == Cached(APP)
    cache.clear()
    assert cache.get("172.17.0.2") is None


def test_static_list_is_round_robin_with_distinct_retries() -> None:
    """A static list is balanced by the proxy's own pool: turns, then the retry order."""
    targets = StaticSpec((Target("10.0.0.5", 80), Target("10.0.0.6", 80),
                          Target("10.0.0.7", 80))).targets
    pool = ServicePool("round_robin")
    picks = [pool.candidates(targets, 3, "172.17.0.2") for _ in range(4)]
    assert [[t.address for t in pick] for pick in picks] == [
        ["10.0.0.5", "10.0.0.6", "10.0.0.7"],
        ["10.0.0.6", "10.0.0.7", "10.0.0.5"],
        ["10.0.0.7", "10.0.0.5", "10.0.0.6"],
        ["10.0.0.5", "10.0.0.6", "10.0.0.7"],
    ]


def test_iptables_print_shows_the_omni_rule() -> None:
    """`consulate iptables --print --ambassador --bridge-ip 172.17.0.1`, with the agent's
    default ports kept out of omni mode."""
    done = subprocess.run([sys.executable, "-m", "consulate.control.cli", "iptables", "--print",
                           "--ambassador", "--bridge-ip", "172.17.0.1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[7] == (
        "-A CONSULATE-PREROUTING -d 172.17.0.1/32 -p tcp -m multiport ! --dports "
        "8500,8600,10000,10001 -j REDIRECT --to-ports 10001")


def test_omni_rule_refuses_a_bad_bridge_and_too_many_ports() -> None:
    with pytest.raises(ConfigError) as caught:
        AgentConfig().ambassador_redirect("172.17.0")
    assert str(caught.value) == "--bridge-ip '172.17.0' is not an IPv4 address"
    many = AgentConfig(dns_addrs=[("127.0.0.1", 5300 + i) for i in range(13)])
    with pytest.raises(ConfigError) as caught:
        many.ambassador_redirect("172.17.0.1")
    ports = ",".join(str(5300 + i) for i in range(13))
    assert str(caught.value) == (
        f"--ambassador: the agent listens on 16 ports ({ports},8500,10000,10001); iptables' "
        "multiport match keeps at most 15 out of omni mode: use fewer --dns-addr ports")


# -- found by make fuzz -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("consul://[", "backend spec 'consul://[': Invalid IPv6 URL: use host:port[,host:port...], "
     "a service name, consul://HOST:PORT/KEY or etcd://HOST:PORT[,HOST:PORT...]/KEY"),
    ("10.0.0.5:²", "backend spec '10.0.0.5:²': '10.0.0.5:²' is not host:port with a port from "
     "1 to 65535 (for example 10.0.0.5:6379)"),
])
def test_specs_that_crashed_are_refused(text: str, message: str) -> None:
    with pytest.raises(BadSpec) as caught:
        parse_spec(text)
    assert str(caught.value) == message


def test_a_label_port_of_other_digits_is_a_problem_not_a_crash() -> None:
    assert container_rules([], {"connect.²": "redis"}) == Rules({}, (
        "label connect.²: '²' is not a port from 1 to 65535 (write BACKEND_6379=... or "
        "connect.6379=...)",))
