"""Test peers run as real processes inside lab containers: an echo server and a client.

The server greets each connection with ``<id>\\n``, echoes every byte it reads,
and after the client's EOF (a half-close) sends ``sha256=<hex of what it read>\\n``
and closes. The client sends a seeded random payload while reading concurrently,
shuts down its writing side, and checks that it got the greeting, its payload
back byte for byte, and the trailer that was sent after its EOF.
It prints one JSON object per connection.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
import threading
import time

CHUNK = 256 * 1024


def serve(port: int, ident: str, mode: str) -> None:
    listener = socket.create_server(("0.0.0.0", port), reuse_port=True, backlog=512)
    print("listening", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_handle, args=(conn, ident, mode), daemon=True).start()


def _handle(conn: socket.socket, ident: str, mode: str) -> None:
    with conn:
        if mode == "sink":  # accept and never read: backpressure tests
            time.sleep(3600)
        conn.sendall(f"{ident}\n".encode())
        digest = hashlib.sha256()
        while data := conn.recv(CHUNK):
            digest.update(data)
            conn.sendall(data)
        conn.sendall(f"sha256={digest.hexdigest()}\n".encode())


def _connect_once(host: str, port: int, payload: bytes, timeout: float) -> dict[str, object]:
    started = time.monotonic()
    result: dict[str, object] = {"ok": False}
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return {**result, "error": f"connect: {exc!r}", "elapsed": time.monotonic() - started}
    sender_error: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            sender_error.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    received = bytearray()
    try:
        while data := sock.recv(CHUNK):
            received += data
    except OSError as exc:
        result["error"] = f"recv: {exc!r}"
    sender.join()
    sock.close()
    result["elapsed"] = time.monotonic() - started
    if sender_error and "error" not in result:
        result["error"] = f"send: {sender_error[0]!r}"
    banner, _, rest = bytes(received).partition(b"\n")
    result["id"] = banner.decode(errors="replace")
    echoed, trailer = rest[: len(payload)], rest[len(payload):]
    expected_trailer = f"sha256={hashlib.sha256(payload).hexdigest()}\n".encode()
    result["echo_ok"] = echoed == payload
    result["trailer_ok"] = trailer == expected_trailer
    result["received"] = len(received)
    result["ok"] = "error" not in result and result["echo_ok"] and result["trailer_ok"]
    return result


def connect(host: str, port: int, count: int, size: int, seed: int, timeout: float,
            seconds: float = 0.0) -> None:
    """``count`` connections one after the other; with ``seconds``, as many as fit
    in that time, each result stamped with its start (``t``, the epoch)."""
    payload = random.Random(seed).randbytes(size)
    if seconds <= 0:
        for _ in range(count):
            print(json.dumps(_connect_once(host, port, payload, timeout)), flush=True)
        return
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.time()
        print(json.dumps({"t": started, **_connect_once(host, port, payload, timeout)}),
              flush=True)


def flood(host: str, port: int, seconds: float) -> None:
    """Send without reading for ``seconds``; report how much the path accepted."""
    sock = socket.create_connection((host, port), timeout=5)
    sock.setblocking(False)
    sent, deadline, chunk = 0, time.monotonic() + seconds, b"x" * CHUNK
    while time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
    print(json.dumps({"accepted": sent}), flush=True)
    sock.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--id", required=True)
    s.add_argument("--mode", choices=["echo", "sink"], default="echo")
    c = sub.add_parser("connect")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--size", type=int, default=1)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("--seconds", type=float, default=0.0)
    f = sub.add_parser("flood")
    f.add_argument("--host", required=True)
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args.port, args.id, args.mode)
    elif args.cmd == "connect":
        connect(args.host, args.port, args.count, args.size, args.seed, args.timeout,
                args.seconds)
    else:
        flood(args.host, args.port, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
