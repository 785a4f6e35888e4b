"""The processes the soak (bench/soak.py) runs inside its lab: an echo backend, a
client that calls a service by name at a steady rate, and a DNS prober.

    python -m bench.soak_load serve --port 7100 --id echo-h2
    python -m bench.soak_load echo --name echo.service.consul --port 7100 --rate 10 --seconds 600
    python -m bench.soak_load dns --server 10.100.1.1:53 --name echo.service.consul \
        --vip 240.0.0.1 --rate 25 --seconds 600

The backend greets each connection with ``<id>\\n``, echoes every byte, and closes
after the client's EOF. The echo client resolves the name for every connection (the
container's resolv.conf points at its host's agent), connects to what it got (the
service's VIP: the transparent proxy takes it from there), sends a seeded payload,
half-closes, and checks that it got the greeting of a known backend and its payload
back byte for byte. The prober sends real UDP queries to the agent's DNS: A (which
must answer exactly the VIP) and SRV (NOERROR, at least the stable instances).

Each process prints ``{"ready": true}`` once it runs (bench.convergence's Child
waits for it). Both clients are paced (a steady load, not a flood: the soak watches growth, not
peak rate) and print one JSON line per operation: ``t`` (epoch at its start), ``ms``,
``ok``, and ``error`` or ``id``. Checking the answers is pure (``check_echo``,
``check_dns``), so the rules are testable without sockets.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator

from dnslib import QTYPE, RCODE, DNSRecord

CHUNK = 65536
PAYLOAD_MAX = 4096  # bytes per connection: 1..PAYLOAD_MAX, seeded by its sequence number
TIMEOUT = 5.0  # seconds for a connection or a DNS answer before it counts as failed
SRV_MIN = 2  # the stable instances every SRV answer must hold


def payload(sequence: int) -> bytes:
    rng = random.Random(sequence)
    return rng.randbytes(rng.randint(1, PAYLOAD_MAX))


def check_echo(received: bytes, sent: bytes, backends: set[str]) -> tuple[str, str]:
    """(backend id, "") when ``received`` is a known backend's greeting followed by
    ``sent`` exactly, else ("", what is wrong)."""
    greeting, newline, echoed = received.partition(b"\n")
    ident = greeting.decode(errors="replace")
    if not newline:
        return "", f"no greeting line in the {len(received)} bytes received"
    if ident not in backends:
        return "", f"greeting {greeting[:40]!r} is no known backend's"
    if echoed != sent:
        return "", f"echo of {ident} differs: sent {len(sent)} bytes, got {len(echoed)} back"
    return ident, ""


def check_dns(answer: DNSRecord, qtype: str, vip: str) -> str:
    """What is wrong with the agent's answer to ``qtype`` for the service ("" if nothing)."""
    rcode = RCODE.get(answer.header.rcode)
    if rcode != "NOERROR":
        return f"{qtype}: rcode {rcode}"
    if qtype == "A":
        got = sorted(str(rr.rdata) for rr in answer.rr if rr.rtype == QTYPE.A)
        return "" if got == [vip] else f"A: answered {got}, expected [{vip!r}]"
    records = [rr for rr in answer.rr if rr.rtype == QTYPE.SRV]
    return "" if len(records) >= SRV_MIN else f"SRV: {len(records)} records, expected >= {SRV_MIN}"


def paced(rate: float, seconds: float) -> Iterator[int]:
    """Yield 0, 1, 2... at ``rate`` per second for ``seconds``; a late step does not
    make the next ones burst (the schedule restarts from now)."""
    interval, start = 1.0 / rate, time.monotonic()
    deadline, due, sequence = start + seconds, start, 0
    while due < deadline:
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        elif pause < -interval:
            due = time.monotonic()
        yield sequence
        sequence += 1
        due += interval


def emit(record: dict[str, object]) -> None:
    print(json.dumps(record), flush=True)


# -- the backend ----------------------------------------------------------------------------


def serve(port: int, ident: str) -> None:
    """Serve until stdin closes: the soak ends a backend by closing its stdin, and a
    backend whose soak died goes with it."""
    listener = socket.create_server(("0.0.0.0", port), reuse_port=True, backlog=256)
    threading.Thread(target=_accept, args=(listener, ident), daemon=True).start()
    emit({"ready": True})
    sys.stdin.read()


def _accept(listener: socket.socket, ident: str) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_echo_back, args=(conn, ident), daemon=True).start()


def _echo_back(conn: socket.socket, ident: str) -> None:
    with conn:
        conn.sendall(f"{ident}\n".encode())
        while data := conn.recv(CHUNK):
            conn.sendall(data)


# -- the clients ----------------------------------------------------------------------------


def _call(name: str, port: int, sent: bytes, backends: set[str]) -> dict[str, object]:
    """Resolve, connect, send, half-close, read to EOF; the record of one connection."""
    began = time.perf_counter()
    vip = str(socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    resolved = time.perf_counter()
    received = bytearray()
    with socket.create_connection((vip, port), timeout=TIMEOUT) as sock:
        # The payload fits the socket buffers both ways: no reader thread needed.
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        while data := sock.recv(CHUNK):
            received += data
    ended = time.perf_counter()
    ident, wrong = check_echo(bytes(received), sent, backends)
    record: dict[str, object] = {"ms": (ended - resolved) * 1000,
                                 "resolve_ms": (resolved - began) * 1000, "ok": not wrong}
    record.update({"error": wrong} if wrong else {"id": ident})
    return record


def echo(name: str, port: int, rate: float, seconds: float, backends: set[str]) -> None:
    emit({"ready": True})
    for sequence in paced(rate, seconds):
        started = time.time()
        try:
            record = _call(name, port, payload(sequence), backends)
        except OSError as exc:
            record = {"ms": (time.time() - started) * 1000, "ok": False, "error": repr(exc)}
        emit({"t": started, **record})


def dns(server: tuple[str, int], name: str, vip: str, rate: float, seconds: float) -> None:
    service = name.split(".", 1)[0]
    questions = {"A": name, "SRV": f"_{service}._tcp.{name.split('.', 1)[1]}"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(server)
        emit({"ready": True})
        for sequence in paced(rate, seconds):
            qtype = "A" if sequence % 2 == 0 else "SRV"
            query = DNSRecord.question(questions[qtype], qtype)
            started, began = time.time(), time.perf_counter()
            emit({"t": started, "qtype": qtype, **_ask(sock, query, qtype, vip, began)})


def _ask(sock: socket.socket, query: DNSRecord, qtype: str, vip: str,
         began: float) -> dict[str, object]:
    """Send one query and wait for the answer with its ID (late answers to earlier,
    timed-out queries are skipped)."""
    sock.sendall(query.pack())
    deadline = began + TIMEOUT
    while (left := deadline - time.perf_counter()) > 0:
        sock.settimeout(left)
        try:
            packet = sock.recv(4096)
        except TimeoutError:
            break
        except OSError as exc:
            return {"ms": (time.perf_counter() - began) * 1000, "ok": False, "error": repr(exc)}
        ms = (time.perf_counter() - began) * 1000
        try:
            answer = DNSRecord.parse(packet)
        except Exception as exc:  # dnslib raises several kinds on garbage
            return {"ms": ms, "ok": False, "error": f"unparsable answer: {exc!r}"}
        if answer.header.id == query.header.id:
            wrong = check_dns(answer, qtype, vip)
            return {"ms": ms, "ok": not wrong, **({"error": wrong} if wrong else {})}
    return {"ms": TIMEOUT * 1000, "ok": False, "error": f"no answer within {TIMEOUT:g} s"}


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--id", required=True)
    for cmd in ("echo", "dns"):
        c = sub.add_parser(cmd)
        c.add_argument("--name", required=True, help="the service's DNS name")
        c.add_argument("--rate", type=float, required=True, help="operations per second")
        c.add_argument("--seconds", type=float, required=True)
    sub.choices["echo"].add_argument("--port", type=int, required=True)
    sub.choices["echo"].add_argument("--backends", required=True,
                                     help="comma-separated ids a greeting may carry")
    sub.choices["dns"].add_argument("--server", type=_address, required=True, help="HOST:PORT")
    sub.choices["dns"].add_argument("--vip", required=True, help="the A answer expected")
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args.port, args.id)
    elif args.cmd == "echo":
        echo(args.name, args.port, args.rate, args.seconds, set(args.backends.split(",")))
    else:
        dns(args.server, args.name, args.vip, args.rate, args.seconds)


if __name__ == "__main__":
    main()
