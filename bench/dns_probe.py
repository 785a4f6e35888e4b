"""An open-loop UDP DNS prober: queries at a fixed rate, client-side round-trip times.

dnsperf 2.10 (Debian bookworm) prints only the mean and standard deviation of its
latencies, so the percentiles come from this prober instead. It sends the queries
of a dnsperf data file in turn at ``--rate`` per second, whatever the server
answers (open loop: a slow server meets the same offered load, and its queue
shows in the latencies), and measures each query from just before ``sendto`` to
the kernel's receive timestamp of its answer (``SO_TIMESTAMPNS``), so that the
prober's own scheduling delays after the answer has arrived do not count.

    python -m bench.dns_probe --server 127.0.0.1:8600 --queries FILE \
        --rate 20000 --duration 10 [--warmup 1]

Prints one JSON object: offered and achieved rate, answers, lost (no answer
within ``--timeout``), non-NOERROR answers, and p50/p90/p99/p99.9/max in µs.
It busy-polls one non-blocking socket: run it alone on a core (taskset).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dnslib import DNSRecord

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
_TIMESPEC = struct.Struct("@qq")
PERCENTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99, "p999": 0.999}


def packets(path: Path) -> list[bytes]:
    """Query packets (ID 0, RD clear) for each ``name TYPE`` line of a dnsperf file."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, qtype = line.split()
            query = DNSRecord.question(name, qtype)
            query.header.id = 0
            query.header.rd = 0
            out.append(bytes(query.pack()))
    if not out:
        raise SystemExit(f"dns_probe: no queries in {path}")
    return out


def percentile(ordered: Sequence[int], share: float) -> int:
    """Nearest-rank percentile of an ascending sequence."""
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def probe(server: tuple[str, int], queries: Sequence[bytes], rate: float, duration: float,
          warmup: float, timeout: float) -> dict[str, float]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect(server)
    sock.setblocking(False)
    ancillary = socket.CMSG_SPACE(_TIMESPEC.size)
    sent_at = [0] * 65536  # by query ID: wall-clock ns of the send, 0 when answered
    measured = [False] * 65536  # sent after the warm-up
    rtts: list[int] = []
    sent = lost = bad_rcode = late = outstanding = 0
    interval = 1e9 / rate
    start = time.time_ns()
    measure_from = start + int(warmup * 1e9)
    stop_sending = measure_from + int(duration * 1e9)
    next_send = float(start)
    qid = total = 0
    count = len(queries)

    def receive() -> None:
        nonlocal bad_rcode, late, outstanding
        while True:
            try:
                data, anc, _flags, _addr = sock.recvmsg(4096, ancillary)
            except BlockingIOError:
                return
            except ConnectionRefusedError:  # ICMP port unreachable: nothing listens
                continue
            if len(data) < 4:
                continue
            rid = (data[0] << 8) | data[1]
            sent_ns = sent_at[rid]
            if not sent_ns:
                late += 1  # answered after being counted lost, or a duplicate
                continue
            sent_at[rid] = 0
            arrived = next((_TIMESPEC.unpack(cdata[:_TIMESPEC.size]) for level, kind, cdata
                            in anc if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS),
                           None)
            received_ns = arrived[0] * 1_000_000_000 + arrived[1] if arrived else time.time_ns()
            if measured[rid]:
                outstanding -= 1
                rtts.append(received_ns - sent_ns)
                if data[3] & 0x0F:
                    bad_rcode += 1

    while True:
        now = time.time_ns()
        if now >= stop_sending:
            break
        while next_send <= now:
            if sent_at[qid] and measured[qid]:  # still unanswered ~65536 queries later
                lost += 1
                outstanding -= 1
            packet = bytes((qid >> 8, qid & 0xFF)) + queries[total % count][2:]
            total += 1
            sent_at[qid] = time.time_ns()
            measured[qid] = sent_at[qid] >= measure_from
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                sock.send(packet)  # if refused, no answer comes: counted as lost
            if measured[qid]:
                sent += 1
                outstanding += 1
            qid = (qid + 1) & 0xFFFF
            next_send += interval
        receive()
    deadline = time.time_ns() + int(timeout * 1e9)
    while time.time_ns() < deadline and outstanding:
        receive()
        time.sleep(0.0005)
    sock.close()
    lost += outstanding
    # Answers later than the timeout count as lost, not as latencies.
    limit = int(timeout * 1e9)
    slow = sum(1 for rtt in rtts if rtt > limit)
    rtts = sorted(rtt for rtt in rtts if rtt <= limit)
    result: dict[str, float] = {
        "offered_qps": rate, "achieved_qps": sent / duration, "sent": sent,
        "answered": len(rtts), "lost": lost + slow, "bad_rcode": bad_rcode, "late": late,
    }
    if rtts:
        result |= {key: percentile(rtts, share) / 1000 for key, share in PERCENTILES.items()}
        result["max"] = rtts[-1] / 1000
        result["mean"] = sum(rtts) / len(rtts) / 1000
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dns_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="HOST:PORT (127.0.0.0/8 only)")
    parser.add_argument("--queries", type=Path, required=True, help="dnsperf data file")
    parser.add_argument("--rate", type=float, default=20000.0, help="queries per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds sent at the rate before measuring")
    parser.add_argument("--timeout", type=float, default=1.0,
                        help="seconds after which a query counts as lost")
    args = parser.parse_args(argv)
    host, _, port = args.server.rpartition(":")
    if not host.startswith("127."):
        parser.error("--server must be on 127.0.0.0/8: this benchmark never leaves the host")
    result = probe((host, int(port)), packets(args.queries), args.rate, args.duration,
                   args.warmup, args.timeout)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
