"""Consul's blocking queries: ``?index=N&wait=D`` on a read means "answer when the
data has moved past index N, or after D".

Shared by the Consul-compatible API, its KV endpoints and the Discoverd API.
"""

from __future__ import annotations

import random

from aiohttp import web

from consulate.control.service_definition import InvalidDefinition, parse_duration

MAX_WAIT = 600.0  # Consul caps ?wait at 10 minutes
DEFAULT_WAIT = 300.0


def blocking_query(request: web.Request) -> tuple[int, float] | None:
    """``?index=N&wait=D`` as Consul reads them: (index, seconds), or None without index.

    The wait is capped at 10 minutes and, as Consul does, stretched by a random
    sixteenth so that many watchers started together do not return together.
    """
    index_text = request.query.get("index")
    if index_text is None:
        return None
    if not (index_text.isascii() and index_text.isdigit()):
        raise web.HTTPBadRequest(text=f"index {index_text!r} must be a non-negative integer")
    try:
        wait = min(parse_duration(request.query.get("wait", f"{int(DEFAULT_WAIT)}s")), MAX_WAIT)
    except InvalidDefinition as exc:
        raise web.HTTPBadRequest(text=f"wait: {exc}") from None
    return int(index_text), wait + random.uniform(0, wait / 16)
