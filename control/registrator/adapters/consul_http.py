"""A small asyncio client of Consul's HTTP API, shared by the consul, consulate and
consulkv adapters: one session, a timeout on every call, and errors that name
the store and what to do."""

from __future__ import annotations

import json
import os
from typing import Any

import aiohttp

from consulate.control.registrator.adapters.base import AdapterError

REQUEST_TIMEOUT = 5.0
TOKEN_VARIABLE = "CONSUL_HTTP_TOKEN"


class ConsulHttp:
    """Calls ``http://host:port``; ``what`` names the store in error messages.

    Writes carry the token in CONSUL_HTTP_TOKEN, as Consul's own clients and
    registrator send it (a consulate agent off loopback requires one).
    """

    def __init__(self, what: str, host: str, port: int) -> None:
        self.what = what
        self.base = f"http://{host}:{port}"
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
            async with self._session.request(method, self.base + path, data=data,
                                             headers=self._headers) as response:
                text = await response.text()
                if response.status == 404 and missing_ok:
                    return None
                if response.status >= 400:
                    raise AdapterError(f"{self.what} at {self.base} refused {method} {path}: "
                                       f"{response.status} {text.strip()}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise AdapterError(f"{self.what} at {self.base} is not answering "
                               f"({type(exc).__name__}: {exc}): start it or fix the "
                               "registry URI") from None
        return json.loads(text) if text.strip() else None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
