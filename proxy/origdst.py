"""The original destination of a REDIRECTed connection (SO_ORIGINAL_DST).

netfilter's REDIRECT rewrites the destination to the proxy's port; conntrack
keeps the address the client asked for, and ``getsockopt(SOL_IP, SO_ORIGINAL_DST)``
returns it as a ``struct sockaddr_in``.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Protocol

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
_SOCKADDR_IN_SIZE = 16


class _SockOpt(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def parse_sockaddr_in(raw: bytes) -> tuple[ipaddress.IPv4Address, int]:
    """Decode a ``struct sockaddr_in``: family (host order), port and address (network order)."""
    if len(raw) < 8:
        raise ValueError(f"sockaddr_in needs 8 bytes or more, got {len(raw)}")
    family = int.from_bytes(raw[0:2], "little")
    if family != socket.AF_INET:
        raise ValueError(f"sockaddr_in has family {family}, expected AF_INET ({socket.AF_INET})")
    return ipaddress.IPv4Address(raw[4:8]), int.from_bytes(raw[2:4], "big")


def original_dst(sock: _SockOpt) -> tuple[ipaddress.IPv4Address, int]:
    """Where the client meant to connect before netfilter redirected it to us."""
    return parse_sockaddr_in(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_SIZE))
