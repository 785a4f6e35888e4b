"""A small asyncio client of Consul's HTTP API, shared by the consul, consulate and
consulkv adapters: one session, a timeout on every call, http or https
(:mod:`consul_tls`), and errors that name the store and what to do."""

from __future__ import annotations

import json
import os
import ssl
from typing import Any

import aiohttp

from consulate.control.registrator.adapters.base import AdapterError
from consulate.control.registrator.adapters.consul_tls import HttpsSettings

REQUEST_TIMEOUT = 5.0
TOKEN_VARIABLE = "CONSUL_HTTP_TOKEN"


class ConsulHttp:
    """Calls ``http://host:port``, or ``https://`` with ``https``; ``what`` names the
    store in error messages.

    Writes carry the token in CONSUL_HTTP_TOKEN, as Consul's own clients and
    registrator send it (a consulate agent off loopback requires one).
    """

    def __init__(self, what: str, host: str, port: int,
                 https: HttpsSettings | None = None) -> None:
        self.what = what
        self.https = https
        self.base = f"{'https' if https else 'http'}://{host}:{port}"
        self._session: aiohttp.ClientSession | None = None
        token = os.environ.get(TOKEN_VARIABLE, "")
        self._headers = {"X-Consul-Token": token} if token else {}

    async def call(self, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
                   missing_ok: bool = False) -> Any:
        """The decoded JSON answer (None when empty, or for 404 with ``missing_ok``)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                             else None)
        try:
            async with self._session.request(
                    method, self.base + path, data=data, headers=self._headers,
                    ssl=self.https.context if self.https else True,
                    server_hostname=self.https.server_name if self.https else None,
            ) as response:
                text = await response.text()
                if response.status == 404 and missing_ok:
                    return None
                if response.status >= 400:
                    raise AdapterError(f"{self.what} at {self.base} refused {method} {path}: "
                                       f"{response.status} {text.strip()}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise AdapterError(self._failure(exc)) from None
        return json.loads(text) if text.strip() else None

    def _failure(self, exc: BaseException) -> str:
        """Why the store could not be reached, and what to do about it."""
        reason = f"{type(exc).__name__}: {exc}"
        # A server that refuses the client's certificate may just hang up.
        hung_up = isinstance(exc, (aiohttp.ServerDisconnectedError,
                                   aiohttp.ClientOSError)) and not isinstance(
            exc, aiohttp.ClientConnectorError)
        if self.https and (isinstance(exc, (aiohttp.ClientSSLError, ssl.SSLError)) or hung_up):
            return f"TLS with {self.what} at {self.base} failed ({reason}): {self.https.hint}"
        if hung_up:
            return (f"{self.what} at {self.base} closed the connection without an answer "
                    f"({reason}): if it serves TLS, use consul-tls:// or set "
                    "CONSUL_HTTP_SSL=true")
        return (f"{self.what} at {self.base} is not answering ({reason}): start it or fix "
                "the registry URI")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
