"""How the agent's HTTP API listens: over TLS when configured, with at most
``--http-max-conns-per-client`` connections per client address, and with header
limits whose errors say what was too big.

The connection limit is Consul's ``limits.http_max_conns_per_client`` (default
200, counted per client IP, answered ``429 Too Many Requests``). Every blocking
query (``?index=``) and event stream holds one connection for as long as it
waits (HTTP/1.1 runs one request at a time on a connection), so the limit also
bounds how many watchers one client can make the agent keep.

Requests whose head breaks aiohttp's limits (a line over 8190 bytes, more than
128 headers) get ``431 Request Header Fields Too Large`` naming the limit, and
one log line without the offending bytes: they may be a token.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from consulate.proxy.limits import LimitEpisodes

log = logging.getLogger("consulate.http")

DEFAULT_MAX_CONNS_PER_CLIENT = 200  # Consul's default http_max_conns_per_client
MAX_LINE = 8190  # bytes of the request line or of one header line (aiohttp's, nginx's 8k)
MAX_HEADERS = 128
REJECT_TIMEOUT = 5.0  # how long a refused connection may take to send its request head
_HEAD_END = b"\r\n\r\n"


LIMIT_NAME = "http_max_conns_per_client"


class ClientConnections:
    """Open connections per client address, and the limit on them (0: none).

    Refusals are logged once per episode (a client hammering the API must not
    flood the log): its first refusal, then, at its next admitted connection,
    how many were refused meanwhile (proxy/limits.py's episodes).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._episodes = LimitEpisodes()

    def admit(self, client: str) -> bool:
        """Count a new connection from ``client``; False (not counted) over the limit."""
        count = self._open.get(client, 0)
        if self.limit and count >= self.limit:
            if self._episodes.refused(LIMIT_NAME, client, self.limit,
                                      time.monotonic()) is not None:
                log.warning("event=http-conn-refused client=%s reason=too-many-connections "
                            "limit=%d", client, self.limit)
            return False
        ended = self._episodes.admitted(LIMIT_NAME, client)
        if ended is not None:
            log.warning("event=http-conn-refusals-ended client=%s limit=%d refused=%d "
                        "seconds=%.3f", client, self.limit, ended.refused,
                        max(time.monotonic() - ended.started, 0.0))
        self._open[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self._open.pop(client) - 1
        if count:
            self._open[client] = count

    def open(self, client: str) -> int:
        return self._open.get(client, 0)


def too_many_connections(client: str, limit: int) -> bytes:
    """The whole 429 answer to a connection over the limit."""
    text = (f"Too many connections from {client}: at most {limit} at once per client "
            "address (--http-max-conns-per-client); close idle connections and blocking "
            "queries, or raise the limit\n").encode()
    return (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(text), text))


class _Refused(asyncio.Protocol):
    """A connection over the limit: answered 429 once its request head is in (so the
    client reads the answer rather than a reset), or closed if none comes soon."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.received = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.timer = asyncio.get_running_loop().call_later(REJECT_TIMEOUT,
                                                           self.transport.close)

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.transport is not None and (_HEAD_END in self.received
                                           or len(self.received) > MAX_LINE):
            self.transport.write(self.answer)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class _Counted(asyncio.Protocol):
    """Hands a connection to aiohttp if its client is under the limit, else to
    ``_Refused``; counts it for as long as it is open."""

    def __init__(self, handler: RequestHandler, connections: ClientConnections) -> None:
        self.handler = handler
        self.connections = connections
        self.inner: asyncio.Protocol = handler
        self.client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else "unknown"
        if not self.connections.admit(self.client):
            self.inner = _Refused(too_many_connections(self.client, self.connections.limit))
            self.client = ""  # not counted
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client:
            self.connections.release(self.client)
        self.inner.connection_lost(exc)


class _ApiRequestHandler(RequestHandler):
    """aiohttp's connection handler, with clear answers to malformed request heads."""

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # The exception's text quotes the request's bytes: never logged.
        log.info("event=http-bad-request client=%s reason=%s", request.remote,
                 type(exc).__name__)
        if isinstance(exc, LineTooLong):
            status, message = 431, (
                f"Request Header Fields Too Large: the request line or a header is longer "
                f"than {MAX_LINE} bytes; send shorter headers (or put data in the body)")
        elif "Too many headers" in str(exc):
            status, message = 431, (
                f"Request Header Fields Too Large: more than {MAX_HEADERS} headers; "
                "send fewer")
        response = web.Response(status=status, text=message or "Bad Request")
        response.force_close()
        return response


class ApiSite(web.BaseSite):
    """A TCP site like aiohttp's TCPSite, whose connections go through the client
    limit and the handler above."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 ssl_context: ssl.SSLContext | None = None,
                 max_conns_per_client: int) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self.host, self.port = host, port
        self.connections = ClientConnections(max_conns_per_client)

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()

        def connection() -> asyncio.Protocol:
            # No access log (aiohttp takes None for it, its hints say otherwise): the
            # agent logs events, not requests.
            handler = _ApiRequestHandler(server, loop=loop, logger=log,
                                         access_log=None,  # type: ignore[arg-type]
                                         max_line_size=MAX_LINE, max_field_size=MAX_LINE,
                                         max_headers=MAX_HEADERS)
            return _Counted(handler, self.connections)

        self._server = await loop.create_server(connection, self.host, self.port,
                                                ssl=self._ssl_context, backlog=self._backlog,
                                                reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]  # the one bound, for port 0
