"""Endpoint URIs (``tcp://HOST:PORT``, ``unix:///PATH``) and the sockets behind them.

Parsing is strict and every refusal names the URI and the accepted forms, since
a typo in an endpoint otherwise shows up only as a peer that never connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

FORMS = "tcp://HOST:PORT (HOST a name, an IPv4 address or [IPv6]) or unix:///ABSOLUTE/PATH"
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with its NUL on Linux


@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint; ``str()`` gives its canonical URI."""

    scheme: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse(uri: str) -> Endpoint:
    """Parse an endpoint URI; ValueError names the URI, the problem and the forms."""
    if not isinstance(uri, str):
        raise TypeError(f"a duplex endpoint is a string such as {FORMS}, got {uri!r}")

    def bad(problem: str) -> ValueError:
        return ValueError(f"bad duplex endpoint {uri!r}: {problem}; use {FORMS}")

    parts = urlsplit(uri)
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise bad("a unix endpoint needs an absolute path after unix:// (three slashes)")
        if parts.query or parts.fragment:
            raise bad("a unix endpoint takes no query or fragment")
        if len(os.fsencode(parts.path)) > _MAX_UNIX_PATH:
            raise bad(f"unix socket paths are limited to {_MAX_UNIX_PATH} bytes")
        return Endpoint("unix", path=parts.path)
    if parts.scheme == "tcp":
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise bad("a tcp endpoint is only a host and a port")
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:  # a port that is not a number or out of range
            raise bad(str(exc)) from None
        if not host:
            raise bad("missing host")
        if port is None:
            raise bad("missing port")
        return Endpoint("tcp", host=host, port=port)
    raise bad(f"unknown scheme {parts.scheme!r}" if parts.scheme else "no scheme")


async def listen(endpoint: Endpoint,
                 factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Server, Endpoint]:
    """Start a listening server; returns it and the endpoint it got (port 0 resolved)."""
    loop = asyncio.get_running_loop()
    if endpoint.scheme == "unix":
        _remove_stale_socket(endpoint.path)
        server = await loop.create_unix_server(factory, endpoint.path)
        return server, endpoint
    server = await loop.create_server(factory, endpoint.host, endpoint.port)
    port = server.sockets[0].getsockname()[1]
    return server, Endpoint("tcp", host=endpoint.host, port=port)


async def dial(endpoint: Endpoint, factory: Callable[[], asyncio.Protocol]) -> None:
    """Connect once (OSError if it fails); the protocol takes it from there."""
    loop = asyncio.get_running_loop()
    if endpoint.scheme == "unix":
        await loop.create_unix_connection(factory, endpoint.path)
    else:
        await loop.create_connection(factory, endpoint.host, endpoint.port)


def remove_socket_file(path: str) -> None:
    """Remove a unix socket file this peer bound (not anything else at that path)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)


def _remove_stale_socket(path: str) -> None:
    """A socket file nobody listens on (a peer that crashed) is removed so that
    bind works again; a live one, or a file that is not a socket, is an error."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EADDRINUSE, f"cannot bind unix://{path}: it exists and is not a "
                      "socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"cannot bind unix://{path}: another process listens "
                  "there")
