"""What the agent's HTTP handlers share: the context they serve from, and the two
pieces of Consul plumbing every read needs (blocking on the index, the index
headers)."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from typing import Any

from aiohttp import web

from consulate.control.blocking import blocking_query
from consulate.control.filter_expr import FilterError, compile_filter
from consulate.control.health.runner import HealthRunner
from consulate.control.local_services import LocalServices
from consulate.control.registry import RegistryBackend


class ApiContext:
    """What the handlers need from the agent, without knowing the agent.

    ``health`` runs the checks of this node's instances; it is made here when the
    caller brings none, so every API (a test's too) runs the checks it accepts.
    ``local`` (the agent's) keeps what is registered through this API alive.
    """

    def __init__(
        self,
        registry: RegistryBackend,
        *,
        node: str,
        node_address: str,
        datacenter: str,
        leader: str,
        self_info: Callable[[], dict[str, Any]],
        token: str = "",
        kv_reads_need_token: bool = False,
        health: HealthRunner | None = None,
        local: LocalServices | None = None,
    ) -> None:
        self.registry = registry
        self.token = token  # "": writes need none (the API listens on loopback only)
        self.kv_reads_need_token = kv_reads_need_token  # the API listens beyond loopback
        self.node = node
        self.node_address = node_address
        self.datacenter = datacenter
        self.leader = leader
        self.self_info = self_info
        self.health = health if health is not None else HealthRunner(registry, node)
        self.local = local  # None: registrations are the caller's to keep alive


CONTEXT = web.AppKey("context", ApiContext)


async def wait_for_change(request: web.Request) -> int:
    """Wait as a Consul blocking query asks; returns the index to answer with."""
    return await wait_past(request.app[CONTEXT].registry, request)


async def wait_past(registry: RegistryBackend, request: web.Request) -> int:
    """Wait until the registry moves past the request's ``?index=`` (or its ``wait``
    runs out); returns the index to answer with.

    An index above the registry's own is taken as the current one: it is what an
    empty registry answers (1, since the API never says 0), so the first write
    must wake its watchers, and a registry that was reset wakes them at its next
    write rather than when it catches up with the old count.
    """
    query = blocking_query(request)
    if query is None:
        return registry.index
    index, wait = query
    return await registry.wait_for_index(min(index, registry.index), wait)


def indexed_json(data: object, index: int) -> web.Response:
    """A read's answer with Consul's headers; the index is never 0, as Consul's."""
    return web.json_response(data, headers={"X-Consul-Index": str(max(index, 1)),
                                            "X-Consul-KnownLeader": "true",
                                            "X-Consul-LastContact": "0"})


async def json_body(request: web.Request) -> object:
    """The request's JSON body (None when empty); 400 with the parser's reason if bad."""
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(
            text=f"Request decode failed: invalid JSON body: {exc}") from None
    except RecursionError:  # the parser's stack, not ours: tell the client, keep serving
        raise web.HTTPBadRequest(text="Request decode failed: the JSON body is nested too "
                                      "deeply") from None


def filtered(request: web.Request, documents: list[dict[str, Any]],
             fields: Collection[str]) -> list[dict[str, Any]]:
    """The documents that match the request's ``?filter=`` (all without one);
    ``fields`` are the valid first parts of a selector (the documents' keys)."""
    text = request.query.get("filter")
    if text is None:
        return documents
    try:
        keep = compile_filter(text, fields)
    except FilterError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return [d for d in documents if keep(d)]
