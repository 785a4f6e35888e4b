"""A small synchronous client of the agent's HTTP API, for the CLI."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class ApiError(Exception):
    """The agent refused a request or could not be reached; the message says which."""


class AgentClient:
    def __init__(self, address: str, timeout: float = 10.0) -> None:
        self.base = address if "://" in address else f"http://{address}"
        self.timeout = timeout

    def request(self, method: str, path: str, body: object = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise ApiError(f"{method} {path}: {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(
                f"no agent answers at {self.base} ({reason}): start one with "
                "`consulate agent` or pass --http-addr"
            ) from None
        return json.loads(raw) if raw else None
