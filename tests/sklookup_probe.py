"""Run inside a lab namespace: steer a VIP range to a listener with proxy/sklookup.py.

    python sklookup_probe.py CIDR

Prints ``ready`` once attached; then answers each connection with one line,
``sockname=<ip>:<port> peer=<ip>:<port>``, and closes it. Runs until killed
(the kernel detaches the program with the process).
"""

from __future__ import annotations

import ipaddress
import socket
import sys

from consulate.proxy import sklookup


def main() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    sklookup.attach(listener, ipaddress.IPv4Network(sys.argv[1]))
    print("ready", flush=True)
    while True:
        conn, peer = listener.accept()
        with conn:
            own = conn.getsockname()
            conn.sendall(f"sockname={own[0]}:{own[1]} peer={peer[0]}:{peer[1]}\n".encode())


if __name__ == "__main__":
    main()
