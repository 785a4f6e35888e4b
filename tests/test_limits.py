"""The proxy's connection limits as pure logic: values, defaults, episodes, log lines, metrics."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from consulate.control import metrics
from consulate.control.config import AgentConfig, ConfigError, parse_count, parse_rate
from consulate.proxy.limits import (
    MAX_CONNECTIONS,
    MAX_PENDING_PER_SERVICE,
    ConnectionLimits,
    LimitEpisodes,
    LimitError,
    cleared_line,
    default_max_connections,
    reached_line,
)
from consulate.proxy.stats import ProxyStats


@pytest.mark.parametrize(("nofile", "expected"), [
    (1024, 384),  # (1024 - 256) / 2
    (20000, 9872),
    (1_048_576, 65536),  # capped
    (257, 1),  # never below one
    (10, 1),
    (resource.RLIM_INFINITY, 65536),
])
def test_default_max_connections_follows_the_descriptor_limit(nofile: int,
                                                              expected: int) -> None:
    assert default_max_connections(nofile) == expected


def test_default_max_connections_reads_this_process_limit() -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert default_max_connections() == default_max_connections(soft)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_connections": 0}, "--max-connections 0 must be from 1 to 2147483647"),
    ({"max_pending_per_service": -3},
     "--max-pending-per-service -3 must be from 1 to 2147483647"),
    ({"max_connections": 2**31}, "--max-connections 2147483648 must be from 1"),
])
def test_bad_limits_name_their_flag(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(LimitError, match=message):
        ConnectionLimits(**kwargs)


def test_an_episode_is_logged_when_it_starts_and_when_it_ends() -> None:
    episodes = LimitEpisodes()
    first = episodes.refused(MAX_CONNECTIONS, "", 4, now=10.0)
    assert first is not None
    assert reached_line(first) == ("event=limit-reached limit=max_connections value=4 "
                                   "action=refuse")
    # Later refusals of the same episode are only counted: nothing to log.
    assert episodes.refused(MAX_CONNECTIONS, "", 4, now=10.5) is None
    assert episodes.refused(MAX_CONNECTIONS, "", 4, now=11.0) is None
    # Another limit (or service) is another episode.
    web = episodes.refused(MAX_PENDING_PER_SERVICE, "web", 2, now=11.0)
    assert web is not None and reached_line(web) == (
        "event=limit-reached limit=max_pending_per_service value=2 service=web action=refuse")
    assert episodes.admitted(MAX_PENDING_PER_SERVICE, "db") is None
    ended = episodes.admitted(MAX_CONNECTIONS, "")
    assert ended is first and ended.refused == 3
    assert cleared_line(ended, now=12.25) == ("event=limit-cleared limit=max_connections "
                                              "value=4 refused=3 seconds=2.250")
    assert episodes.admitted(MAX_CONNECTIONS, "") is None  # over: nothing more to log
    assert [e.service for e in episodes.ongoing()] == ["web"]
    # The next refusal starts a new episode.
    assert episodes.refused(MAX_CONNECTIONS, "", 4, now=20.0) is not None


@pytest.mark.parametrize(("text", "auto", "value"), [
    ("auto", True, 0), ("AUTO", True, 0), ("1", False, 1), ("65536", True, 65536)])
def test_counts_parse(text: str, auto: bool, value: int) -> None:
    assert parse_count("--max-connections", text, auto=auto) == value


@pytest.mark.parametrize(("flag", "text", "auto", "message"), [
    ("--max-connections", "0", True,
     "--max-connections '0' must be a whole number of 1 or more or auto"),
    ("--max-connections", "many", True, "--max-connections 'many' must be a whole number"),
    ("--max-pending-per-service", "auto", False,
     r"--max-pending-per-service 'auto' must be a whole number of 1 or more \(for"),
    ("--max-pending-per-service", "-1", False, "--max-pending-per-service '-1' must be"),
    ("--max-pending-per-service", "2.5", False, "--max-pending-per-service '2.5' must be"),
])
def test_bad_counts_are_refused_with_the_flag(flag: str, text: str, auto: bool,
                                              message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_count(flag, text, auto=auto)


@pytest.mark.parametrize("text", ["-1", "fast", "nan", "inf"])
def test_bad_rates_are_refused_with_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match=f"--dns-rate-limit '{text}' must be a number of 0"):
        parse_rate("--dns-rate-limit", text)


def test_config_derives_max_connections_and_checks_the_rest() -> None:
    config = AgentConfig(max_connections=0, max_pending_per_service=7)
    assert config.connection_limits() == ConnectionLimits(default_max_connections(), 7)
    config.max_pending_per_service = 0
    with pytest.raises(ConfigError, match="--max-pending-per-service 0 must be from 1"):
        config.validate()
    config = AgentConfig(dns_rate_limit=-1.0)
    with pytest.raises(ConfigError, match=r"--dns-rate-limit -1\.0 must be 0"):
        config.validate()
    assert AgentConfig(dns_rate_limit=25.0).dns_config().rate_limit == 25.0


def _samples(scrape: metrics.Scrape) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(sample.name, tuple(sample.labels.values())): sample.value
            for family in metrics.families(scrape) for sample in family.samples}


def _scrape(proxy: dict[str, object], dns_rate_limited: int | None) -> metrics.Scrape:
    return metrics.Scrape(proxy=proxy, relay="python", endpoints={"web": 1},
                          route_version=1, dns_rcodes=[0] * 16, watch={},
                          dns_rate_limited=dns_rate_limited)


def test_limit_counters_become_envoy_like_metrics() -> None:
    stats = ProxyStats()
    stats.overflow = 3
    web = stats.of("web")
    web.pending_active, web.pending_overflow = 2, 7
    samples = _samples(_scrape(stats.snapshot(), dns_rate_limited=11))
    assert samples[("consulate_downstream_cx_overflow_total", ())] == 3
    assert samples[("consulate_upstream_rq_pending_active", ("web",))] == 2
    assert samples[("consulate_upstream_rq_pending_overflow_total", ("web",))] == 7
    assert samples[("consulate_dns_rate_limited_total", ())] == 11


def test_dns_rate_limit_metric_only_when_the_limit_is_on() -> None:
    names = {name for name, _ in _samples(_scrape(ProxyStats().snapshot(), None))}
    assert "consulate_dns_rate_limited_total" not in names
    assert "consulate_downstream_cx_overflow_total" in names


def test_the_agent_refuses_bad_limit_flags(tmp_path: Path) -> None:
    for flag, value, message in (
            ("--max-connections", "0", "--max-connections '0' must be a whole number of 1 "
                                       "or more or auto"),
            ("--max-pending-per-service", "lots", "--max-pending-per-service 'lots' must be "
                                                  "a whole number of 1 or more"),
            ("--dns-rate-limit", "-5", "--dns-rate-limit '-5' must be a number of 0 (off)")):
        done = subprocess.run(
            [sys.executable, "-m", "consulate.control.cli", "agent", "--no-iptables",
             "--data-dir", str(tmp_path), flag, value], capture_output=True, text=True,
            timeout=60)
        assert (done.returncode, message in done.stderr) == (1, True), done.stderr
