"""The HTTP API's bounds: connections (and so watchers) per client address, header
size and count, body size. The API listens as the agent's does (``ApiSite``) on
127.0.0.1 over an embedded registry; clients are raw sockets, so every answer is
checked byte for byte, from 127.0.0.1 and 127.0.0.2 (two client addresses)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from apiclient import make_context

from consulate.control.cli import _agent_config, build_parser
from consulate.control.config import AgentConfig, ConfigError
from consulate.control.http_api import build_app
from consulate.control.http_listener import ApiSite, ClientConnections, too_many_connections
from consulate.control.registry import EmbeddedRegistry, Instance

LIMIT = 3
WAIT = 30.0  # generous: every wait below ends on an event long before


@pytest.fixture
async def site(registry: EmbeddedRegistry) -> AsyncIterator[ApiSite]:
    runner = web.AppRunner(build_app(make_context(registry)), handler_cancellation=True,
                           shutdown_timeout=1.0)  # a failed test's watchers end at once
    await runner.setup()
    api = ApiSite(runner, "127.0.0.1", 0, max_conns_per_client=LIMIT)
    await api.start()
    yield api
    await runner.cleanup()


async def _send(site: ApiSite, head: bytes, *, source: str = "127.0.0.1",
                body: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(site.host, site.port,
                                                   local_addr=(source, 0))
    writer.write(head + body)
    return reader, writer


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """The whole answer of a connection the server closes (Connection: close)."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
        await writer.wait_closed()


async def _exchange(site: ApiSite, head: bytes, *, source: str = "127.0.0.1",
                    body: bytes = b"") -> bytes:
    return await _answer(*await _send(site, head, source=source, body=body))


def _status_and_body(answer: bytes) -> tuple[bytes, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


def _get(path: str, *extra: bytes) -> bytes:
    return (b"GET %s HTTP/1.1\r\nHost: agent\r\n%sConnection: close\r\n\r\n"
            % (path.encode(), b"".join(extra)))


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_client_over_its_connection_limit_gets_429_and_others_are_unaffected(
        site: ApiSite, registry: EmbeddedRegistry, caplog: pytest.LogCaptureFixture) -> None:
    index = registry.index
    watch = _get(f"/v1/catalog/services?index={index}&wait=60s")
    watchers = [await _send(site, watch) for _ in range(LIMIT)]
    await _until(lambda: site.connections.open("127.0.0.1") == LIMIT)

    refused = await _exchange(site, _get("/v1/catalog/services"))
    assert refused == too_many_connections("127.0.0.1", LIMIT)
    assert await _exchange(site, _get("/v1/catalog/services")) == refused
    assert too_many_connections("127.0.0.1", LIMIT) == (
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 169\r\nConnection: close\r\n\r\nToo many connections from "
        b"127.0.0.1: at most 3 at once per client address (--http-max-conns-per-client); "
        b"close idle connections and blocking queries, or raise the limit\n")

    answer = await _exchange(site, _get("/v1/catalog/services"), source="127.0.0.2")
    assert _status_and_body(answer) == (b"HTTP/1.1 200 OK", b"{}")

    _, leaving = watchers.pop()  # a watcher goes: its place is free again
    leaving.close()
    await leaving.wait_closed()
    await _until(lambda: site.connections.open("127.0.0.1") == LIMIT - 1)
    answer = await _exchange(site, _get("/v1/catalog/services"))
    assert _status_and_body(answer) == (b"HTTP/1.1 200 OK", b"{}")
    # One line when the refusals start, one when they end (with their count).
    lines = [r.getMessage() for r in caplog.records if "http-conn-ref" in r.getMessage()]
    assert lines[0] == ("event=http-conn-refused client=127.0.0.1 reason=too-many-connections "
                        "limit=3")
    assert lines[1].startswith("event=http-conn-refusals-ended client=127.0.0.1 limit=3 "
                               "refused=2 seconds=")
    assert len(lines) == 2

    # The watchers held all along still wake on a write.
    await registry.register(Instance(id="web-1", name="web", address="10.0.0.1", port=80))
    for watcher in watchers:
        assert _status_and_body(await _answer(*watcher)) == (b"HTTP/1.1 200 OK",
                                                             b'{"web": []}')
    await _until(lambda: site.connections.open("127.0.0.1") == 0)


async def test_an_oversized_header_gets_431_without_its_value_in_the_log(
        site: ApiSite, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = b"s3cret-" + b"x" * 9000
    answer = await _exchange(site, _get("/v1/catalog/services", b"X-Consul-Token: %s\r\n"
                                        % secret))
    assert _status_and_body(answer) == (
        b"HTTP/1.0 431 Request Header Fields Too Large",
        b"Request Header Fields Too Large: the request line or a header is longer than "
        b"8190 bytes; send shorter headers (or put data in the body)")
    assert "event=http-bad-request client=127.0.0.1 reason=LineTooLong" in caplog.text
    assert "s3cret" not in caplog.text

    answer = await _exchange(site, _get("/v1/catalog/services"))  # still serving
    assert _status_and_body(answer) == (b"HTTP/1.1 200 OK", b"{}")


async def test_too_many_headers_get_431(site: ApiSite) -> None:
    headers = [b"X-H%d: 1\r\n" % i for i in range(200)]
    answer = await _exchange(site, _get("/v1/catalog/services", *headers))
    assert _status_and_body(answer) == (
        b"HTTP/1.0 431 Request Header Fields Too Large",
        b"Request Header Fields Too Large: more than 128 headers; send fewer")


async def test_a_long_url_gets_431(site: ApiSite) -> None:
    status, body = _status_and_body(await _exchange(site, _get("/v1/kv/" + "k" * 9000)))
    assert status == b"HTTP/1.0 431 Request Header Fields Too Large"
    assert body.startswith(b"Request Header Fields Too Large: the request line")


async def test_a_body_over_1_mib_gets_413_naming_the_limit_and_stores_nothing(
        site: ApiSite, registry: EmbeddedRegistry) -> None:
    body = b"x" * (1024 * 1024 + 1)
    head = (b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: agent\r\nContent-Length: %d"
            b"\r\nConnection: close\r\n\r\n" % len(body))
    assert _status_and_body(await _exchange(site, head, body=body)) == (
        b"HTTP/1.1 413 Request Entity Too Large",
        b"Request body too large, max size: 1048576 bytes (for a KV value, 524288 bytes)")
    assert (await registry.instances())[0] == []


def test_client_connections_count_per_address() -> None:
    connections = ClientConnections(2)
    assert [connections.admit("10.0.0.1") for _ in range(3)] == [True, True, False]
    assert connections.admit("10.0.0.2")
    connections.release("10.0.0.1")
    assert (connections.open("10.0.0.1"), connections.admit("10.0.0.1")) == (1, True)
    unlimited = ClientConnections(0)
    assert all(unlimited.admit("10.0.0.1") for _ in range(10_000))


def test_the_limit_flag_defaults_to_consuls_200_and_refuses_negatives(tmp_path: Path) -> None:
    args = build_parser().parse_args(["agent", "--data-dir", str(tmp_path)])
    assert _agent_config(args).http_max_conns_per_client == 200
    args = build_parser().parse_args(["agent", "--http-max-conns-per-client", "0"])
    assert _agent_config(args).http_max_conns_per_client == 0
    with pytest.raises(ConfigError, match=re.escape(
            "--http-max-conns-per-client -1 must be 0 (no limit) or more (Consul's default "
            "is 200)")):
        AgentConfig(data_dir=tmp_path, http_max_conns_per_client=-1).validate()
