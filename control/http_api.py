"""The agent's HTTP API (aiohttp): the Consul-compatible subset users script against.

Errors are plain text, as Consul sends them: status 400 for a bad request, 404
for an unknown id, 405 for a wrong method, 503 when the registry backend cannot
be reached (the agent keeps serving; the message names the backend). Blocking
queries (``?index=&wait=``) work on the catalog reads, so Consul tooling that
long-polls works unchanged.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler

from consulate.control import health_api, kv_api
from consulate.control.api_context import (
    CONTEXT,
    ApiContext,
    filtered,
    indexed_json,
    json_body,
    wait_for_change,
)
from consulate.control.registry import Instance, UnknownInstance
from consulate.control.registry.model import RegistryUnavailable
from consulate.control.service_definition import (
    InvalidDefinition,
    agent_service,
    catalog_entry,
    parse_registration,
)

# The keys of each answer's elements: what a ?filter= selector may start with.
_SAMPLE = Instance(id="", name="", address="", port=0)
_CATALOG_FIELDS = tuple(catalog_entry(_SAMPLE, node_address="", datacenter=""))
_AGENT_SERVICE_FIELDS = tuple(agent_service(_SAMPLE, datacenter=""))


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message)


async def register_service(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    try:
        instance = parse_registration(
            await json_body(request), node=ctx.node, default_address=ctx.node_address
        )
    except InvalidDefinition as exc:
        raise _bad_request(str(exc)) from None
    if not ctx.health.scripts_enabled and any(c.kind == "script" for c in instance.checks):
        raise _bad_request("Scripts are disabled on this agent; to enable them, start it "
                           "with --enable-script-checks")
    sent = 0.0
    if ctx.local is not None:
        instance = ctx.local.owned(instance)
        sent = ctx.local.now()
    stored = await ctx.registry.register(
        instance.keeping_check_results(await ctx.registry.get(instance.id)))
    if ctx.local is not None:
        ctx.local.added(stored, sent)
    ctx.health.observe(stored)
    return web.Response()


async def deregister_service(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    instance_id = request.match_info["service_id"]
    if ctx.local is not None:
        ctx.local.removed(instance_id)
    try:
        await ctx.registry.deregister(instance_id)
    except UnknownInstance as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    return web.Response()


async def catalog_services(request: web.Request) -> web.Response:
    await wait_for_change(request)
    instances, index = await request.app[CONTEXT].registry.instances()
    services: dict[str, set[str]] = {}
    for instance in instances:
        services.setdefault(instance.name, set()).update(instance.tags)
    return indexed_json({name: sorted(tags) for name, tags in sorted(services.items())}, index)


async def catalog_nodes(request: web.Request) -> web.Response:
    """``GET /v1/catalog/nodes``: this agent's node and every node instances were
    registered from. The registry keeps no node table: another node's address is
    the address of its first instance, which is all this agent knows of it."""
    ctx = request.app[CONTEXT]
    await wait_for_change(request)
    instances, index = await ctx.registry.instances()
    addresses = {ctx.node: ctx.node_address}
    for instance in sorted(instances, key=lambda i: (i.create_index, i.id)):
        if instance.node:
            addresses.setdefault(instance.node, instance.address)
    return indexed_json([{"ID": "", "Node": node, "Address": address, "Datacenter": ctx.datacenter,
                   "TaggedAddresses": {"lan": address, "wan": address}, "Meta": {},
                   "CreateIndex": 0, "ModifyIndex": 0}
                  for node, address in sorted(addresses.items())], index)


async def catalog_service(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    await wait_for_change(request)
    instances, index = await ctx.registry.instances(request.match_info["name"])
    wanted_tags = request.query.getall("tag", [])
    entries = [
        catalog_entry(i, node_address=ctx.node_address, datacenter=ctx.datacenter)
        for i in instances
        if all(tag in i.tags for tag in wanted_tags)
    ]
    return indexed_json(filtered(request, entries, _CATALOG_FIELDS), index)


async def agent_services(request: web.Request) -> web.Response:
    """``GET /v1/agent/services``: the instances this agent's node holds, by ID (what
    registrator's -cleanup compares with the running containers)."""
    ctx = request.app[CONTEXT]
    instances, _ = await ctx.registry.instances()
    entries = [agent_service(i, datacenter=ctx.datacenter) for i in instances
               if i.node == ctx.node]
    return web.json_response({entry["ID"]: entry
                              for entry in filtered(request, entries, _AGENT_SERVICE_FIELDS)})


async def agent_self(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONTEXT].self_info())


async def status_leader(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONTEXT].leader)


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
    expected = request.app[CONTEXT].token
    if expected and request.method in _WRITES and not hmac.compare_digest(
            presented_token(request).encode(), expected.encode()):
        raise web.HTTPForbidden(text="Permission denied: this write needs the agent's token "
                                     "(send it as X-Consul-Token or Authorization: Bearer)")
    return await handler(request)


def build_app(context: ApiContext) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024,
                          middlewares=[_writes_need_the_token, _registry_unavailable])
    app[CONTEXT] = context
    app.router.add_put("/v1/agent/service/register", register_service)
    app.router.add_put("/v1/agent/service/deregister/{service_id}", deregister_service)
    app.router.add_get("/v1/catalog/services", catalog_services)
    app.router.add_get("/v1/catalog/nodes", catalog_nodes)
    app.router.add_get("/v1/catalog/service/{name}", catalog_service)
    app.router.add_get("/v1/agent/services", agent_services)
    app.router.add_get("/v1/agent/self", agent_self)
    app.router.add_get("/v1/status/leader", status_leader)
    kv_api.add_routes(app, context.registry)
    health_api.add_routes(app)
    return app
