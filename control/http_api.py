"""The agent's HTTP API (aiohttp): the Consul-compatible subset users script against.

Errors are plain text, as Consul sends them: status 400 for a bad request, 404
for an unknown id, 405 for a wrong method, 503 when the registry backend cannot
be reached (the agent keeps serving; the message names the backend). Blocking
queries (``?index=&wait=``) work on the catalog reads, so Consul tooling that
long-polls works unchanged.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from consulate.control import kv_api
from consulate.control.blocking import blocking_query
from consulate.control.registry import RegistryBackend, UnknownInstance
from consulate.control.registry.model import RegistryUnavailable
from consulate.control.service_definition import (
    InvalidDefinition,
    agent_service,
    catalog_entry,
    parse_registration,
)


class ApiContext:
    """What the handlers need from the agent, without knowing the agent."""

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
    ) -> None:
        self.registry = registry
        self.token = token  # "": writes need none (the API listens on loopback only)
        self.node = node
        self.node_address = node_address
        self.datacenter = datacenter
        self.leader = leader
        self.self_info = self_info


_CONTEXT = web.AppKey("context", ApiContext)


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message)


async def _json_body(request: web.Request) -> object:
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad_request(f"Request decode failed: invalid JSON body: {exc}") from None


async def register_service(request: web.Request) -> web.Response:
    ctx = request.app[_CONTEXT]
    try:
        instance = parse_registration(
            await _json_body(request), node=ctx.node, default_address=ctx.node_address
        )
    except InvalidDefinition as exc:
        raise _bad_request(str(exc)) from None
    await ctx.registry.register(instance)
    return web.Response()


async def deregister_service(request: web.Request) -> web.Response:
    ctx = request.app[_CONTEXT]
    try:
        await ctx.registry.deregister(request.match_info["service_id"])
    except UnknownInstance as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    return web.Response()


async def pass_ttl_check(request: web.Request) -> web.Response:
    """``PUT /v1/agent/check/pass/service:<id>``: Consul's TTL check update, a heartbeat."""
    ctx = request.app[_CONTEXT]
    check_id = request.match_info["check_id"]
    instance_id = check_id.removeprefix("service:")
    try:
        await ctx.registry.heartbeat(instance_id)
    except UnknownInstance:
        raise web.HTTPNotFound(
            text=f"Unknown check ID {check_id!r}: TTL checks of services are 'service:<id>'"
        ) from None
    return web.Response()


async def _block(request: web.Request) -> int:
    """Wait as a Consul blocking query asks; returns the index."""
    registry = request.app[_CONTEXT].registry
    query = blocking_query(request)
    if query is None:
        return registry.index
    return await registry.wait_for_index(*query)


def _json(data: object, index: int) -> web.Response:
    return web.json_response(data, headers={"X-Consul-Index": str(index),
                                            "X-Consul-KnownLeader": "true"})


async def catalog_services(request: web.Request) -> web.Response:
    await _block(request)
    instances, index = await request.app[_CONTEXT].registry.instances()
    services: dict[str, set[str]] = {}
    for instance in instances:
        services.setdefault(instance.name, set()).update(instance.tags)
    return _json({name: sorted(tags) for name, tags in sorted(services.items())}, index)


async def catalog_nodes(request: web.Request) -> web.Response:
    """``GET /v1/catalog/nodes``: this agent's node and every node instances were
    registered from. The registry keeps no node table: another node's address is
    the address of its first instance, which is all this agent knows of it."""
    ctx = request.app[_CONTEXT]
    await _block(request)
    instances, index = await ctx.registry.instances()
    addresses = {ctx.node: ctx.node_address}
    for instance in sorted(instances, key=lambda i: (i.create_index, i.id)):
        if instance.node:
            addresses.setdefault(instance.node, instance.address)
    return _json([{"ID": "", "Node": node, "Address": address, "Datacenter": ctx.datacenter,
                   "TaggedAddresses": {"lan": address, "wan": address}, "Meta": {},
                   "CreateIndex": 0, "ModifyIndex": 0}
                  for node, address in sorted(addresses.items())], index)


async def catalog_service(request: web.Request) -> web.Response:
    ctx = request.app[_CONTEXT]
    await _block(request)
    instances, index = await ctx.registry.instances(request.match_info["name"])
    wanted_tags = request.query.getall("tag", [])
    entries = [
        catalog_entry(i, node_address=ctx.node_address, datacenter=ctx.datacenter)
        for i in instances
        if all(tag in i.tags for tag in wanted_tags)
    ]
    return _json(entries, index)


async def agent_services(request: web.Request) -> web.Response:
    """``GET /v1/agent/services``: the instances this agent's node holds, by ID (what
    registrator's -cleanup compares with the running containers)."""
    ctx = request.app[_CONTEXT]
    instances, _ = await ctx.registry.instances()
    return web.json_response({i.id: agent_service(i, datacenter=ctx.datacenter)
                              for i in instances if i.node == ctx.node})


async def agent_self(request: web.Request) -> web.Response:
    return web.json_response(request.app[_CONTEXT].self_info())


async def status_leader(request: web.Request) -> web.Response:
    return web.json_response(request.app[_CONTEXT].leader)


@web.middleware
async def _registry_unavailable(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegistryUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=str(exc)) from None


_WRITES = frozenset({"PUT", "POST", "DELETE", "PATCH"})


def presented_token(request: web.Request) -> str:
    """The token a request carries, the ways Consul takes it: X-Consul-Token, or
    ``Authorization: Bearer``."""
    token = request.headers.get("X-Consul-Token", "")
    if not token:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
    return token


@web.middleware
async def _writes_need_the_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    expected = request.app[_CONTEXT].token
    if expected and request.method in _WRITES and not hmac.compare_digest(
            presented_token(request).encode(), expected.encode()):
        raise web.HTTPForbidden(text="Permission denied: this write needs the agent's token "
                                     "(send it as X-Consul-Token or Authorization: Bearer)")
    return await handler(request)


def build_app(context: ApiContext) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024,
                          middlewares=[_writes_need_the_token, _registry_unavailable])
    app[_CONTEXT] = context
    app.router.add_put("/v1/agent/service/register", register_service)
    app.router.add_put("/v1/agent/service/deregister/{service_id}", deregister_service)
    app.router.add_put("/v1/agent/check/pass/{check_id}", pass_ttl_check)
    app.router.add_get("/v1/catalog/services", catalog_services)
    app.router.add_get("/v1/catalog/nodes", catalog_nodes)
    app.router.add_get("/v1/catalog/service/{name}", catalog_service)
    app.router.add_get("/v1/agent/services", agent_services)
    app.router.add_get("/v1/agent/self", agent_self)
    app.router.add_get("/v1/status/leader", status_leader)
    kv_api.add_routes(app, context.registry)
    return app
