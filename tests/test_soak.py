"""The soak's machinery (bench/soak.py, `make soak`): a short real run, and the rules
that judge growth, cut windows and check answers.

The short run builds the same lab as `make soak` (3 hosts, an etcd member and an
agent on each, the clients, the prober and the churn) for 15 s and checks what
it reports: its structure and that nothing failed. It asserts no timing: latency
and growth are the benchmark's business, not a test's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dnslib import QTYPE, RR, A, DNSRecord

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/ is no installed package: import it from the tree

from bench.soak import Run, parse_args  # noqa: E402
from bench.soak_load import check_dns, check_echo, payload  # noqa: E402
from bench.soak_report import growth, slope, windows  # noqa: E402

SECONDS = 15
HOSTS = ("h1", "h2", "h3")


@pytest.fixture(scope="module")
def soaked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("soak")
    done = subprocess.run([sys.executable, "-m", "bench.soak", "--seconds", str(SECONDS),
                           "--sample", "1", "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.mark.lab
def test_short_soak_reports_every_part_and_no_error(soaked: Path) -> None:
    report: dict[str, Any] = json.loads((soaked / "soak.json").read_text())
    head = report["summary"]
    assert report["registry"] == "etcd"
    assert head["live_endpoint_errors"] == 0, head["errors_shown"]
    assert head["errors_shown"] == []
    assert head["echo"]["errors"] == 0 and head["echo"]["count"] > 0
    assert head["dns"]["errors"] == 0 and head["dns"]["count"] > 0
    assert head["resolve"]["count"] == head["echo"]["count"]
    assert head["churn"]["failed"] == []
    assert head["churn"]["backend_cycles"] >= 1 and head["churn"]["api_rounds"] >= 1
    # Both stable backends and the churned one answered connections by name.
    assert set(head["echo"]["by_backend"]) == {"echo-h2", "echo-h3", "echo-churn"}
    assert sum(head["echo"]["by_backend"].values()) == head["echo"]["count"]
    assert set(head["agents"]) == set(HOSTS)
    fields = {"start", "end", "first_half", "last_half", "span_minutes", "slope_per_minute",
              "tolerance", "growth", "flat"}
    for series in head["agents"].values():
        assert set(series) == {"rss_kib", "fds"}
        assert all(set(g) == fields for g in series.values())
    samples = report["samples"]
    assert len(samples) >= SECONDS - 1
    assert all(set(s["agents"]) == set(HOSTS) and s["load1"] >= 0 for s in samples)
    assert all(a["rss_kib"] > 0 and a["fds"] > 0 for s in samples for a in s["agents"].values())
    cut = report["windows"]  # 5 s windows (the default for a run this short)
    assert [(w["start"], w["end"]) for w in cut] == [(0, 5), (5, 10), (10, 15)]
    assert sum(w["echo"]["count"] for w in cut) == head["echo"]["count"]
    assert sum(w["dns"]["count"] for w in cut) == head["dns"]["count"]
    assert all(w["echo"]["count"] > 0 and w["dns"]["count"] > 0 for w in cut)


@pytest.mark.lab
def test_short_soak_writes_the_markdown_and_the_plots(soaked: Path) -> None:
    text = (soaked / "soak.md").read_text()
    for heading in ("## Machine", "## Conditions", "## Verdict",
                    "## Memory and file descriptors per agent", "## Load and latency per 5 s"):
        assert f"\n{heading}" in text
    assert "errors on live endpoints: **0**" in text and "**PASS**" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 0-5 ", "| 5-10 ",
                                                                    "| 10-15 "))]
    assert len(rows) == 3
    for plot in ("soak-memory.png", "soak-latency.png"):
        assert f"]({plot})" in text
        assert (soaked / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_growth_flags_a_leak_and_passes_noise() -> None:
    # A spike every 11th sample (GC, a burst), the first one included: no growth.
    noisy = [(5.0 * n, 1000.0 + (300 if n % 11 == 0 else 0)) for n in range(120)]
    judged = growth(noisy, tolerance=100, skip=60)
    assert judged.flat and judged.growth == 0 and judged.start == 1300 and judged.end == 1000
    leaking = [(float(t), 1000.0 + 2 * t) for t in range(0, 600, 5)]  # 120 per minute
    judged = growth(leaking, tolerance=100, skip=60)
    assert not judged.flat
    assert judged.slope_per_minute == pytest.approx(120)
    # Halves after the warm-up: t 60..325 and 330..595, middles 192.5 and 462.5 s apart.
    assert judged.span_minutes == pytest.approx(4.5)
    assert judged.growth == pytest.approx(2 * 270)


def test_growth_leaves_the_warm_up_out() -> None:
    started = [(0.0, 10.0), (5.0, 500.0), (10.0, 900.0), (15.0, 900.0), (20.0, 901.0),
               (25.0, 900.0)]
    judged = growth(started, tolerance=4, skip=10)
    assert (judged.first_half, judged.last_half, judged.flat) == (900.0, 900.5, True)
    with pytest.raises(ValueError, match="no samples"):
        growth([], tolerance=4, skip=0)


def test_slope_is_per_minute() -> None:
    assert slope([(0.0, 5.0), (30.0, 6.0), (60.0, 7.0)]) == pytest.approx(2.0)
    assert slope([(1.0, 5.0)]) == 0.0


def test_windows_count_each_operation_once_by_its_start() -> None:
    run = Run(seconds=10, registry="etcd", rates={"echo": 1, "dns": 1}, sample=1,
              started=1000.0)
    run.echo = [{"t": 1000.0, "ms": 1.0, "ok": True}, {"t": 1004.99, "ms": 3.0, "ok": True},
                {"t": 1005.0, "ms": 9.0, "ok": False}, {"t": 1010.2, "ms": 2.0, "ok": True}]
    run.churn = [{"t": 1006.0, "kind": "backend", "ok": True},
                 {"t": 1007.0, "kind": "api", "ok": False}]
    run.samples = [{"t": 0.0, "load1": 2.5}, {"t": 4.0, "load1": 3.0}, {"t": 10.0, "load1": 1.0}]
    first, second = windows(run, 5)
    assert (first.echo.count, first.echo.errors, first.echo.p50_ms, first.echo.p99_ms) == \
        (2, 0, 1.0, 3.0)
    # The last window also holds what started after the nominal end (a client's last call).
    assert (second.echo.count, second.echo.errors, second.echo.p50_ms) == (2, 1, 2.0)
    assert (second.backend_cycles, second.api_writes, first.dns.count) == (1, 0, 0)
    assert first.dns.p50_ms is None
    assert (first.load1, second.load1) == (3.0, 1.0)


def test_echo_check_is_byte_exact() -> None:
    sent = payload(7)
    assert sent == payload(7) and 1 <= len(sent) <= 4096
    backends = {"echo-h2", "echo-h3"}
    assert check_echo(b"echo-h2\n" + sent, sent, backends) == ("echo-h2", "")
    assert check_echo(b"echo-h9\n" + sent, sent, backends) == (
        "", "greeting b'echo-h9' is no known backend's")
    assert check_echo(b"echo-h3\n" + sent[:-1], sent, backends) == (
        "", f"echo of echo-h3 differs: sent {len(sent)} bytes, got {len(sent) - 1} back")
    assert check_echo(b"echo-h3", b"", backends) == (
        "", "no greeting line in the 7 bytes received")


def test_dns_check_wants_exactly_the_vip() -> None:
    query = DNSRecord.question("echo.service.consul", "A")
    answer = query.reply()
    answer.add_answer(RR("echo.service.consul", QTYPE.A, rdata=A("240.0.0.1"), ttl=0))
    assert check_dns(answer, "A", "240.0.0.1") == ""
    assert check_dns(answer, "A", "240.0.0.2") == \
        "A: answered ['240.0.0.1'], expected ['240.0.0.2']"
    missing = query.reply()
    missing.header.rcode = 3
    assert check_dns(missing, "A", "240.0.0.1") == "A: rcode NXDOMAIN"
    srv = DNSRecord.question("_echo._tcp.service.consul", "SRV").reply()
    assert check_dns(srv, "SRV", "240.0.0.1") == "SRV: 0 records, expected >= 2"


@pytest.mark.parametrize(("argv", "message"), [
    (["--seconds", "5"], "--seconds 5: give at least 10"),
    (["--echo-rate", "0"], "--echo-rate 0: give a positive number"),
    (["--sample", "-1"], "--sample -1: give a positive number"),
    (["--window", "-3"], "--window -3: give a positive number, or 0 for the default"),
    (["--registry", "zookeeper"], "invalid choice: 'zookeeper'"),
])
def test_bad_options_are_refused_with_the_fix(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_default_window_is_a_twentieth_of_the_run() -> None:
    assert parse_args([]).window == 30 and parse_args(["--seconds", "20"]).window == 5
    assert parse_args(["--seconds", "60", "--window", "12"]).window == 12
