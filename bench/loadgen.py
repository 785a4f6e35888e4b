"""Load generators run in container c2 (iperf3, wrk) and the parsing of what they print.

Parsing is kept in pure functions so that a change in a tool's output shows up as
a clear error naming the tool, not as a silently wrong number.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from bench.peers import CLIENT, taskset
from consulate.control.lab import Lab

# A run may take this long beyond its duration (start-up, connection teardown).
SLACK = 30.0
# wrk counts a request that failed at socket level or got a non-2xx/3xx answer as
# an error; above this share of all requests the run says nothing about the path.
MAX_ERROR_SHARE = 0.01


class LoadError(RuntimeError):
    """A load generator failed or printed something unexpected."""


def parse_iperf3(text: str) -> float:
    """Received bits/s from ``iperf3 -J`` output."""
    try:
        report = json.loads(text)
    except ValueError as exc:
        raise LoadError(f"iperf3 printed no JSON: {text[:200]!r}") from exc
    if report.get("error"):
        raise LoadError(f"iperf3: {report['error']}")
    try:
        return float(report["end"]["sum_received"]["bits_per_second"])
    except (KeyError, TypeError) as exc:
        raise LoadError(f"iperf3 JSON has no end.sum_received.bits_per_second: {exc!r}") from exc


def iperf3(lab: Lab, target: tuple[str, int], streams: int, duration: float,
           cpus: set[int] | None) -> float:
    """Run an iperf3 client from c2 against target; returns Gbit/s received."""
    address, port = target
    argv = [*taskset(cpus), "iperf3", "-c", address, "-p", str(port), "-P", str(streams),
            "-t", f"{duration:g}", "-J", "--connect-timeout", "3000"]
    done = lab.exec(CLIENT, argv, capture_output=True, text=True, timeout=duration + SLACK)
    bits = parse_iperf3(done.stdout)
    if done.returncode != 0:
        raise LoadError(f"iperf3 exited with {done.returncode}: {done.stderr.strip()[:200]}")
    return bits / 1e9


def parse_netstat(text: str) -> dict[str, int]:
    """/proc/net/netstat: pairs of lines ``Prefix: names...`` / ``Prefix: values...``."""
    counters = {}
    lines = text.splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        prefix = names.split(":", 1)[0]
        for name, value in zip(names.split()[1:], values.split()[1:], strict=False):
            counters[f"{prefix}{name}"] = int(value)
    return counters


def time_wait_total(lab: Lab, where: str) -> int:
    """How many sockets have entered TIME_WAIT in a namespace since it was made."""
    done = lab.exec(where, ["cat", "/proc/net/netstat"], capture_output=True, text=True,
                    check=True, timeout=10)
    counters = parse_netstat(done.stdout)
    if "TcpExtTW" not in counters:
        raise LoadError("/proc/net/netstat has no TcpExt TW counter")
    return counters["TcpExtTW"]


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    requests: int
    errors: int
    latency_us: dict[str, float]  # percentile ("50", "99", ...) -> microseconds


_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}
_PERCENTILE = re.compile(r"^\s+(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)


def parse_wrk(text: str) -> WrkResult:
    """Rate, request and error counts, and the ``--latency`` distribution if present."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s+(\d+) requests in ", text, re.M)
    if rate is None or total is None:
        raise LoadError(f"wrk printed no request rate: {text[-300:]!r}")
    errors = 0
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                        text)
    if sockets:
        errors += sum(int(n) for n in sockets.groups())
    status = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if status:
        errors += int(status.group(1))
    latency = {pct.removesuffix(".0"): float(value) * _UNITS_US[unit]
               for pct, value, unit in _PERCENTILE.findall(text)}
    return WrkResult(float(rate.group(1)), int(total.group(1)), errors, latency)


def wrk(lab: Lab, url: str, connections: int, duration: float, cpus: set[int] | None,
        *, close: bool = False, latency: bool = False) -> WrkResult:
    """One wrk thread from c2; ``close`` sends ``Connection: close`` (a connection per
    request), ``latency`` asks for the percentile distribution."""
    argv = [*taskset(cpus), "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s"]
    if close:
        argv += ["-H", "Connection: close"]
    if latency:
        argv.append("--latency")
    done = lab.exec(CLIENT, [*argv, url], capture_output=True, text=True,
                    timeout=duration + SLACK)
    if done.returncode != 0:
        raise LoadError(f"wrk exited with {done.returncode}: "
                        f"{(done.stderr or done.stdout).strip()[:200]}")
    result = parse_wrk(done.stdout)
    if result.requests == 0 or result.errors > MAX_ERROR_SHARE * result.requests:
        raise LoadError(f"wrk: {result.errors} errors in {result.requests} requests")
    if latency and not {"50", "99"} <= result.latency_us.keys():
        raise LoadError(f"wrk printed no p50/p99: {done.stdout[-300:]!r}")
    return result
