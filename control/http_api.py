"""The agent's HTTP API (aiohttp): the Consul-compatible subset users script against.

Errors are plain text, as Consul sends them: status 400 for a bad request, 403
without the agent's token where it is needed (every write, and KV reads when the
API listens beyond loopback), 404 for an unknown id, 405 for a wrong method, 413
for a body over 1 MiB, 503 when the registry backend cannot be reached (the agent
keeps serving; the message names the backend), except for a registration through
an agent that owns its instances: it is kept and registered once the backend
answers, as a Consul agent syncs its local state to the servers. Blocking
queries (``?index=&wait=``) work on the catalog reads, so Consul tooling that
long-polls works unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

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

log = logging.getLogger("consulate.api")

# The keys of each answer's elements: what a ?filter= selector may start with.
_SAMPLE = Instance(id="", name="", address="", port=0)
_CATALOG_FIELDS = tuple(catalog_entry(_SAMPLE, node_address="", datacenter=""))
_AGENT_SERVICE_FIELDS = tuple(agent_service(_SAMPLE, datacenter=""))
MAX_BODY = 1024 * 1024  # bytes of a request body (Consul's KV transactions take as much)


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
    try:
        stored = await ctx.registry.register(
            instance.keeping_check_results(await ctx.registry.get(instance.id)))
    except RegistryUnavailable as exc:
        if ctx.local is None:
            raise
        # As a Consul agent with no server: kept locally, synced when the registry answers.
        ctx.local.deferred(instance)
        log.warning("event=register-deferred id=%s service=%s error=%s: kept by this agent, "
                    "registered once the registry answers", instance.id, instance.name, exc)
        return web.Response()
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
_TOKEN_HINT = "(send it as X-Consul-Token or Authorization: Bearer)"


def presented_token(request: web.Request) -> str:
    """The token a request carries, the ways Consul takes it: X-Consul-Token, or
    ``Authorization: Bearer``."""
    token = request.headers.get("X-Consul-Token", "")
    if not token:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
    return token


def token_matches(presented: str, expected: str) -> bool:
    """Compared in constant time, over digests so that not even the length of the
    expected token shows in the time taken."""
    return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(),
                               hashlib.sha256(expected.encode()).digest())


def _token_denial(request: web.Request, ctx: ApiContext) -> str | None:
    """Why the request needs the token it lacks, or None when it may go on: every
    write needs it, and so do KV reads when the API listens beyond loopback
    (Consul's default-deny ACLs, for the data most likely to be secret)."""
    if not ctx.token:
        return None
    if request.method in _WRITES:
        need = "this write needs the agent's token"
    elif ctx.kv_reads_need_token and request.path.startswith("/v1/kv/"):
        need = ("reading KV needs the agent's token when the API listens beyond "
                "loopback")
    else:
        return None
    if token_matches(presented_token(request), ctx.token):
        return None
    return f"Permission denied: {need} {_TOKEN_HINT}"


@web.middleware
async def _token_required(request: web.Request, handler: Handler) -> web.StreamResponse:
    denial = _token_denial(request, request.app[CONTEXT])
    if denial is not None:
        raise web.HTTPForbidden(text=denial)
    return await handler(request)


@web.middleware
async def _body_within_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 413 (past ``client_max_size``), said as Consul says it."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as exc:
        if exc.text is None or not exc.text.startswith("Maximum request body size"):
            raise  # a handler's own, already explained
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_BODY, actual_size=request.content_length or MAX_BODY + 1,
            text=f"Request body too large, max size: {MAX_BODY} bytes (for a KV value, "
                 f"{kv_api.MAX_VALUE} bytes)") from None


def build_app(context: ApiContext) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY,
                          middlewares=[_token_required, _body_within_limit,
                                       _registry_unavailable])
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
