"""Decoding SO_ORIGINAL_DST's struct sockaddr_in."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from consulate.proxy.origdst import parse_sockaddr_in


def test_parses_family_port_and_address() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 80) + bytes([246, 1, 2, 3])
    assert parse_sockaddr_in(raw + bytes(8)) == (ipaddress.IPv4Address("246.1.2.3"), 80)


def test_rejects_short_or_foreign_addresses() -> None:
    with pytest.raises(ValueError, match="needs 8 bytes or more, got 4"):
        parse_sockaddr_in(bytes(4))
    raw = struct.pack("=H", socket.AF_INET6) + bytes(14)
    with pytest.raises(ValueError, match="expected AF_INET"):
        parse_sockaddr_in(raw)
