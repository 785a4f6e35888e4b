"""UDP benchmark: a UDP service through its VIP against the direct path, same run.

One lab (host h1 runs a real ``consulate agent``, c1 a UDP echo server registered
as a ``udp``-tagged service, c2 the client). Variants, taking turns within each
repetition in a rotated order:

- ``direct``: c2 -> c1:7000, bridged by h1, no VIP;
- ``vip``: c2 -> the service's VIP (from the agent's DNS): the agent's NFQUEUE
  decides each flow's first datagram, conntrack DNAT carries the rest (proxy/udp.py);
- ``vip+nfqueue-accept`` and ``vip+nfqueue-scapy``: the same path, with every
  datagram, both ways, also queued to a Python NFQUEUE program in h1 that accepts
  it as is, or parses it with scapy, rewrites its addresses and checksums and
  re-serialises it. That is the cost a userspace per-datagram design (NFQUEUE +
  scapy for every datagram, the alternative to proxy/udp.py's) would add.

Three measurements per variant: datagrams/s (echo ping-pong over 4 flows with 32
datagrams in flight each, recvmmsg/sendmmsg on both ends), the request-reply RTT
of one flow (one datagram in flight), and the RTT of the first datagram of a new
flow (a new socket each time: for ``vip`` it includes the agent's decision).

    python -m bench.udp [--reps 3] [--duration 3] [--variants direct,vip,...]

Results: ``udp.md``, ``udp.png`` and the raw samples in ``udp.json``.
Subcommands ``serve``, ``load``, ``ping`` and ``nfq`` are the processes it runs
inside the lab.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bench/udp.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.report import Metric, Section
from bench.signals import run_main
from consulate.control import lab as labs
from consulate.control.labagent import LabAgent

HOST, SERVER, CLIENT = "h1", "h1c1", "h1c2"
PORT = 7000
SERVICE = "bench-udp"
QUEUE = 2  # the per-datagram NFQUEUE of the nfqueue variants (the agent's is 10000)
SERVER_CPUS, CLIENT_CPUS = "0", "1"
PAYLOAD = 64
FLOWS, WINDOW = 4, 32
RESULTS = Path(__file__).absolute().parent / "results"
ROOT = Path(__file__).absolute().parent.parent  # where `bench` is importable from

DPS = Metric("dps", "datagrams", "datagrams/s", True, 0)
RTT50 = Metric("rtt_p50_us", "RTT p50", "µs", False, 1)
RTT99 = Metric("rtt_p99_us", "RTT p99", "µs", False, 1)
FIRST50 = Metric("first_p50_us", "first datagram of a flow p50", "µs", False, 1)
SECTION = Section("udp", "UDP echo: datagrams/s and round trips", (DPS, RTT50, RTT99, FIRST50),
                  "udp.png", versus=("direct", "vip"))
VARIANTS = {
    "direct": "c2 -> c1:7000, bridged by h1, no VIP",
    "vip": "c2 -> VIP:7000 (dig bench-udp.service.consul): NFQUEUE for a flow's first "
           "datagram, conntrack DNAT + masquerade for the rest (proxy/udp.py)",
    "vip+nfqueue-accept": "vip, and every datagram both ways through a Python NFQUEUE "
                          "program that accepts it (mangle PREROUTING in h1)",
    "vip+nfqueue-scapy": "vip, and every datagram both ways through a Python NFQUEUE "
                         "program that rewrites it with scapy (parse, set addresses, "
                         "recompute checksums, rebuild)",
}


READING = """
How to read it: ``vip`` pays the kernel's routed path (conntrack DNAT + masquerade
through h1) where ``direct`` is bridged, and the agent's decision only on a flow's
first datagram (the first-datagram column). The ``nfqueue`` rows add, to that same
path, one trip through userspace per datagram each way: what a design that rewrote
every datagram in userspace would pay at least (``accept`` does no work at all;
``scapy`` does the parsing and rebuilding such a design needs). p99 on a shared
2-core machine is scheduler noise of a few ms for every variant.
"""


# -- processes inside the lab ------------------------------------------------------


def serve(port: int) -> None:
    """Echo every datagram to its sender, a recvmmsg/sendmmsg batch at a time."""
    from consulate.native.udp import UdpBatch

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    batch = UdpBatch(sock, slots=64, slot_size=2048)
    print("listening", flush=True)
    while True:
        select.select([sock], [], [])
        received = batch.receive()
        batch.send(list(enumerate(received)))


def load(host: str, port: int, seconds: float) -> dict[str, float]:
    """Ping-pong ``FLOWS`` x ``WINDOW`` datagrams for ``seconds``: replies per second.

    Each reply is sent straight back to its sender (the VIP or c1), so the window
    stays full; a window that lost datagrams is refilled after 20 ms of silence.
    """
    from consulate.native.udp import UdpBatch

    payload = os.urandom(PAYLOAD)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(FLOWS)]
    batches = {}
    for sock in socks:
        sock.setblocking(False)
        batches[sock.fileno()] = UdpBatch(sock, slots=64, slot_size=2048)

    def prime() -> None:
        for sock in socks:
            for _ in range(WINDOW):
                sock.sendto(payload, (host, port))

    poller = select.epoll()
    for sock in socks:
        poller.register(sock.fileno(), select.EPOLLIN)
    prime()
    replies, refills = 0, 0
    started = time.monotonic()
    deadline = started + seconds
    while (now := time.monotonic()) < deadline:
        events = poller.poll(0.02)
        if not events:
            refills += 1
            prime()
            continue
        for fd, _ in events:
            batch = batches[fd]
            received = batch.receive()
            replies += len(received)
            batch.send(list(enumerate(received)))
    return {DPS.key: replies / (now - started), "refills": refills}


def ping(host: str, port: int, count: int, new_flows: bool) -> dict[str, float]:
    """RTTs of ``count`` datagrams, one in flight; a new socket each time if new_flows."""
    payload = os.urandom(PAYLOAD)
    rtts: list[float] = []
    lost = 0
    sock = None
    for _ in range(count):
        if sock is None or new_flows:
            if sock is not None:
                sock.close()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(1.0)
            sock.connect((host, port))
        started = time.perf_counter_ns()
        sock.send(payload)
        try:
            if sock.recv(4096) != payload:
                raise RuntimeError("the echo differs from the datagram sent")
        except TimeoutError:
            lost += 1
            continue
        rtts.append((time.perf_counter_ns() - started) / 1000)
    if sock is not None:
        sock.close()
    if len(rtts) < count // 2:
        raise RuntimeError(f"{lost} of {count} datagrams got no echo within 1 s")
    cuts = statistics.quantiles(rtts, n=100)
    return {"p50_us": cuts[49], "p99_us": cuts[98], "lost": lost}


def nfq(queue: int, mode: str) -> None:
    """Give every queued datagram a verdict: as is, or rewritten by scapy."""
    from netfilterqueue import NetfilterQueue, Packet
    from scapy.layers.inet import IP, UDP

    def accept(packet: Packet) -> None:
        packet.accept()

    def rewrite(packet: Packet) -> None:
        parsed = IP(packet.get_payload())
        parsed.src, parsed.dst = parsed.src, parsed.dst  # what a NAT would set
        parsed[UDP].sport, parsed[UDP].dport = parsed[UDP].sport, parsed[UDP].dport
        del parsed[IP].chksum, parsed[UDP].chksum  # recomputed on build
        packet.set_payload(bytes(parsed))
        packet.accept()

    queue_handle = NetfilterQueue()
    queue_handle.bind(queue, accept if mode == "accept" else rewrite, max_len=8192)
    print("bound", flush=True)
    queue_handle.run()


# -- the harness ----------------------------------------------------------------------


def _in_lab(lab: labs.Lab, where: str, cpus: str, *args: str, timeout: float = 120
            ) -> dict[str, float]:
    done = lab.exec(where, ["taskset", "-c", cpus, sys.executable, "-m", "bench.udp", *args],
                    capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                           else f"exit {done.returncode}")
    result: dict[str, float] = json.loads(done.stdout)
    return result


def _started(lab: labs.Lab, where: str, argv: list[str], ready: bytes
             ) -> subprocess.Popen[bytes]:
    proc = lab.popen(where, argv, stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != ready:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{' '.join(argv[-4:])} did not start (said {line!r})")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


class Queued:
    """A per-datagram NFQUEUE program in h1 and the rule that feeds it, for one variant."""

    RULES = tuple(("PREROUTING", "-p", "udp", "-m", "udp", match, str(PORT), "-j", "NFQUEUE",
                   "--queue-num", str(QUEUE)) for match in ("--dport", "--sport"))

    def __init__(self, lab: labs.Lab, mode: str) -> None:
        self.lab = lab
        self.proc = _started(lab, HOST, ["taskset", "-c", SERVER_CPUS, sys.executable, "-m",
                                         "bench.udp", "nfq", "--mode", mode], b"bound\n")
        for rule in self.RULES:
            lab.exec(HOST, ["iptables", "-t", "mangle", "-A", *rule], check=True)

    def stop(self) -> None:
        for rule in self.RULES:
            self.lab.exec(HOST, ["iptables", "-t", "mangle", "-D", *rule], check=True)
        _stop(self.proc)


def _resolve(lab: labs.Lab) -> str:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        answer = lab.exec(CLIENT, ["dig", "+short", "+time=1", "+tries=1",
                                   f"{SERVICE}.service.consul"],
                          capture_output=True, text=True, timeout=10).stdout.split()
        if answer:
            return answer[0]
        time.sleep(0.1)
    raise RuntimeError(f"{SERVICE}.service.consul did not resolve in c2")


def _measure(lab: labs.Lab, target: str, duration: float, pings: int, firsts: int
             ) -> dict[str, float]:
    dps = _in_lab(lab, CLIENT, CLIENT_CPUS, "load", "--host", target, "--seconds",
                  str(duration))
    rtt = _in_lab(lab, CLIENT, CLIENT_CPUS, "ping", "--host", target, "--count", str(pings))
    first = _in_lab(lab, CLIENT, CLIENT_CPUS, "ping", "--host", target, "--count", str(firsts),
                    "--new-flows")
    return {DPS.key: dps[DPS.key], RTT50.key: rtt["p50_us"], RTT99.key: rtt["p99_us"],
            FIRST50.key: first["p50_us"], "lost": rtt["lost"] + first["lost"]}


def _run_variant(lab: labs.Lab, name: str, vip: str, args: argparse.Namespace
                 ) -> dict[str, float]:
    target = lab.container_ip(1, 1) if name == "direct" else vip
    queued = Queued(lab, name.rsplit("-", 1)[1]) if "nfqueue" in name else None
    try:
        return _measure(lab, target, args.duration, args.pings, args.firsts)
    finally:
        if queued is not None:
            queued.stop()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.udp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("serve")
    p.add_argument("--port", type=int, default=PORT)
    for name in ("load", "ping"):
        p = sub.add_parser(name)
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, default=PORT)
        if name == "load":
            p.add_argument("--seconds", type=float, default=3.0)
        else:
            p.add_argument("--count", type=int, default=1000)
            p.add_argument("--new-flows", action="store_true")
    p = sub.add_parser("nfq")
    p.add_argument("--queue", type=int, default=QUEUE)
    p.add_argument("--mode", choices=("accept", "scapy"), required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, of " + ", ".join(VARIANTS) +
                        " (direct and vip are always measured: the ratios use them)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds of the datagrams/s run (default 3)")
    parser.add_argument("--pings", type=int, default=2000,
                        help="round trips for the RTT of one flow (default 2000)")
    parser.add_argument("--firsts", type=int, default=300,
                        help="new flows for the first-datagram RTT (default 300)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"directory for udp.md, udp.png and udp.json (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.command is None:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            parser.error(f"unknown variant(s) {', '.join(unknown)}: use any of "
                         f"{', '.join(VARIANTS)}")
        args.variants = list(dict.fromkeys(["direct", "vip", *names]))
        if args.reps < 1 or args.duration <= 0 or args.pings < 100 or args.firsts < 100:
            parser.error("--reps must be at least 1, --duration above 0, --pings and "
                         "--firsts at least 100")
    return args


def _subcommand(args: argparse.Namespace) -> int:
    commands: dict[str, Callable[[], Any]] = {
        "serve": lambda: serve(args.port),
        "load": lambda: load(args.host, args.port, args.seconds),
        "ping": lambda: ping(args.host, args.port, args.count, args.new_flows),
        "nfq": lambda: nfq(args.queue, args.mode),
    }
    result = commands[args.command]()
    if result is not None:
        print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.command is not None:
        return _subcommand(args)
    variants: list[str] = args.variants
    results: report.Results = {SECTION.key: {name: report.Cell() for name in variants}}
    work = Path(tempfile.mkdtemp(prefix="consulate-bench-udp-"))
    started = time.monotonic()
    lab = labs.up(hosts=1, containers=2, name=f"{labs.LAB_PREFIX}bench-{os.urandom(3).hex()}")
    agent = LabAgent(lab, 1, work / "data", work / "agent.log", extra_args=["--relay", "python"])
    server = None
    try:
        agent.start()
        server = _started(lab, SERVER, ["taskset", "-c", SERVER_CPUS, sys.executable, "-m",
                                        "bench.udp", "serve"], b"listening\n")
        agent.api("PUT", "/v1/agent/service/register",
                  {"ID": f"{SERVICE}-1", "Name": SERVICE, "Address": lab.container_ip(1, 1),
                   "Port": PORT, "Tags": ["udp"]})
        vip = _resolve(lab)
        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", flush=True)
            turn = rep % len(variants)
            for name in variants[turn:] + variants[:turn]:
                cell = results[SECTION.key][name]
                try:
                    sample = _run_variant(lab, name, vip, args)
                except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                    cell.errors.append(str(exc)[:300])
                    print(f"  {name:<20} failed: {exc}", flush=True)
                    continue
                cell.samples.append(sample)
                print(f"  {name:<20} " + " ".join(f"{k}={v:,.1f}" for k, v in sample.items()),
                      flush=True)
    finally:
        if server is not None:
            _stop(server)
        agent.stop()
        lab.down()
    _write(args, time.monotonic() - started, variants, results)
    if not results[SECTION.key]["direct"].samples:
        print("bench.udp: error: the direct path failed: every ratio is relative to it",
              file=sys.stderr)
        return 1
    print(f"done: {args.out / 'udp.md'}")
    return 0


def _added(results: report.Results, variants: Sequence[str]) -> str:
    """Medians over direct's: what each path adds to a round trip."""
    cells = results[SECTION.key]
    lines = ["| variant | added RTT p50 (µs) | added RTT p99 (µs) | added first-datagram p50 "
             "(µs) | datagrams/s vs direct |", "|---|---|---|---|---|"]
    for name in variants:
        row = [name]
        for metric in (RTT50, RTT99, FIRST50):
            value, base = cells[name].median(metric.key), cells["direct"].median(metric.key)
            row.append("—" if value is None or base is None else f"{value - base:+,.1f}")
        dps, base = cells[name].median(DPS.key), cells["direct"].median(DPS.key)
        row.append("—" if dps is None or not base else f"{dps / base:.3g}x")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _write(args: argparse.Namespace, elapsed: float, variants: list[str],
           results: report.Results) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    conditions = [
        ("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")),
        ("command", " ".join(["python -m bench.udp", *sys.argv[1:]])),
        ("machine", f"{os.cpu_count()} cores, kernel {platform.release()}, "
                    f"python {platform.python_version()}"),
        ("repetitions", f"{args.reps}; variants take turns in an order rotated by one per "
                        f"repetition; {elapsed / 60:.1f} min in all"),
        ("datagrams/s", f"{FLOWS} flows x {WINDOW} datagrams of {PAYLOAD} bytes in flight, "
                        f"echoed, {args.duration:g} s; client (c2) on CPU {CLIENT_CPUS}, "
                        f"echo server (c1) and the nfqueue programs on CPU {SERVER_CPUS}, "
                        "the agent unpinned"),
        ("RTT", f"{args.pings} round trips of one flow, one datagram in flight"),
        ("first datagram", f"{args.firsts} new flows (a new socket each), the RTT of each "
                           "one's first datagram"),
        ("conntrack", "on for every variant (the agent's nat rules are in h1 throughout)"),
    ]
    text = report.markdown("UDP benchmark: a service through its VIP vs the direct path",
                           [("Conditions", conditions),
                            ("Variants", [(n, VARIANTS[n]) for n in variants])],
                           [SECTION], results, variants, args.reps)
    text += "\n## Added over the direct path (medians)\n\n" + _added(results, variants)
    text += READING
    (out / "udp.md").write_text(text)
    report.chart(SECTION, results[SECTION.key], variants, out / SECTION.chart)
    (out / "udp.json").write_text(json.dumps(report.results_json(results), indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(run_main(main))
