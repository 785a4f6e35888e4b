"""Duplex endpoint URIs and reconnection backoff (no sockets but one probe)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from consulate.control.duplex.backoff import Backoff
from consulate.control.duplex.endpoints import Endpoint, listen, parse


@pytest.mark.parametrize(("uri", "endpoint", "canonical"), [
    ("tcp://127.0.0.1:7000", Endpoint("tcp", host="127.0.0.1", port=7000), None),
    ("tcp://localhost:0", Endpoint("tcp", host="localhost", port=0), None),
    ("tcp://[::1]:7000/", Endpoint("tcp", host="::1", port=7000), "tcp://[::1]:7000"),
    ("unix:///run/x.sock", Endpoint("unix", path="/run/x.sock"), None),
])
def test_endpoints_parse_and_print_canonically(uri: str, endpoint: Endpoint,
                                                canonical: str | None) -> None:
    assert parse(uri) == endpoint
    assert str(endpoint) == (canonical or uri)


@pytest.mark.parametrize(("uri", "problem"), [
    ("127.0.0.1:7000", "no scheme"),
    ("localhost:7000", "unknown scheme 'localhost'"),
    ("/run/x.sock", "no scheme"),
    ("http://host:80", "unknown scheme 'http'"),
    ("tcp://host", "missing port"),
    ("tcp://:80", "missing host"),
    ("tcp://host:http", "Port could not be cast"),
    ("tcp://host:70000", "Port out of range"),
    ("tcp://host:80/path", "only a host and a port"),
    ("unix://relative.sock", "absolute path"),
    ("unix:///x.sock?mode=1", "no query"),
    ("unix:///" + "x" * 120, "limited to 107 bytes"),
])
def test_bad_endpoints_name_the_uri_and_the_accepted_forms(uri: str, problem: str) -> None:
    with pytest.raises(ValueError, match="bad duplex endpoint") as caught:
        parse(uri)
    message = str(caught.value)
    assert repr(uri) in message and problem in message
    assert "tcp://HOST:PORT" in message and "unix:///ABSOLUTE/PATH" in message


def test_an_endpoint_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="a duplex endpoint is a string"):
        parse(7000)  # type: ignore[arg-type]


def test_backoff_grows_to_its_cap_with_jitter_and_resets() -> None:
    low = Backoff(initial=0.1, maximum=1.0, rng=lambda: 0.0)
    assert [round(low.next(), 3) for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    high = Backoff(initial=0.1, maximum=1.0, rng=lambda: 1.0)
    assert [round(high.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    high.reset()
    assert high.next() == pytest.approx(0.1)


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="0 < initial"):
        Backoff(initial=2.0, maximum=1.0)


async def test_a_stale_unix_socket_is_replaced_and_a_live_one_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a crashed peer's
    server, _ = await listen(parse(f"unix://{path}"), lambda: None)  # type: ignore[arg-type,return-value]
    try:
        with pytest.raises(OSError, match="another process listens there"):
            await listen(parse(f"unix://{path}"), lambda: None)  # type: ignore[arg-type,return-value]
    finally:
        server.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="exists and is not a socket"):
        await listen(parse(f"unix://{path}"), lambda: None)  # type: ignore[arg-type,return-value]
