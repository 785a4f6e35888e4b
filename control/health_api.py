"""Consul's health endpoints: TTL check updates, and reads of check results.

``/v1/agent/check/pass|warn|fail/<id>`` (``?note=`` becomes the output) and
``/v1/agent/check/update/<id>`` (``{"Status": ..., "Output": ...}``) set a TTL
check's result; ``/v1/agent/checks`` lists this node's checks;
``/v1/health/service/<name>`` (``passing``, ``tag``, ``filter``, blocking),
``/v1/health/checks/<name>`` and ``/v1/health/state/<state>`` read results as
Consul answers them.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from consulate.control.api_context import (
    CONTEXT,
    filtered,
    indexed_json,
    json_body,
    wait_for_change,
)
from consulate.control.health.consul_json import (
    CHECK_FIELDS,
    HEALTH_FIELDS,
    check_entry,
    health_entry,
)
from consulate.control.health.runner import UnknownCheck
from consulate.control.registry.model import CHECK_STATUSES, CheckStatus, Instance
from consulate.control.service_definition import agent_service

_VERBS: dict[str, CheckStatus] = {"pass": "passing", "warn": "warning", "fail": "critical"}


def _flag(request: web.Request, name: str) -> bool:
    """A Consul boolean query flag: present (``?passing``, ``?passing=1``) unless
    given as false."""
    return name in request.query and request.query[name].lower() not in ("0", "false")


async def _set_ttl_result(request: web.Request, status: CheckStatus, output: str) -> None:
    ctx = request.app[CONTEXT]
    try:
        await ctx.health.update_ttl(request.match_info["check_id"], status, output)
    except UnknownCheck as exc:
        raise web.HTTPNotFound(text=str(exc)) from None


async def check_verb(request: web.Request) -> web.Response:
    """``PUT /v1/agent/check/pass|warn|fail/<id>?note=...``."""
    await _set_ttl_result(request, _VERBS[request.match_info["verb"]],
                          request.query.get("note", ""))
    return web.Response()


async def check_update(request: web.Request) -> web.Response:
    """``PUT /v1/agent/check/update/<id>`` with ``{"Status": ..., "Output": ...}``."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='Request body must be a JSON object like '
                                      '{"Status": "passing", "Output": "ok"}')
    fields = {key.lower(): value for key, value in body.items()}
    status, output = fields.get("status"), fields.get("output", "")
    if status not in CHECK_STATUSES:
        raise web.HTTPBadRequest(text=f"Invalid check status: {status!r}: use passing, "
                                      "warning or critical")
    if not isinstance(output, str):
        raise web.HTTPBadRequest(text=f"Output must be a string, got {output!r}")
    await _set_ttl_result(request, status, output)
    return web.Response()


async def agent_checks(request: web.Request) -> web.Response:
    """``GET /v1/agent/checks``: the checks this agent runs, by CheckID."""
    ctx = request.app[CONTEXT]
    instances, _ = await ctx.registry.instances()
    entries = [check_entry(i, c) for i in instances if i.node == ctx.node for c in i.checks]
    kept = filtered(request, entries, CHECK_FIELDS)
    return web.json_response({entry["CheckID"]: entry for entry in kept})


def _health_entry(request: web.Request, instance: Instance) -> dict[str, Any]:
    ctx = request.app[CONTEXT]
    address = ctx.node_address if instance.node == ctx.node else instance.address
    service = agent_service(instance, datacenter=ctx.datacenter)
    del service["Datacenter"]
    return health_entry(instance, node_address=address, datacenter=ctx.datacenter,
                        service=service)


async def health_service(request: web.Request) -> web.Response:
    """``GET /v1/health/service/<name>``: instances with their checks; ``?passing``
    keeps only those whose checks all pass, ``?tag=`` (repeatable) those with the tags."""
    ctx = request.app[CONTEXT]
    await wait_for_change(request)
    instances, index = await ctx.registry.instances(request.match_info["name"])
    tags = request.query.getall("tag", [])
    passing_only = _flag(request, "passing")
    entries = [_health_entry(request, i) for i in instances
               if all(t in i.tags for t in tags)
               and (not passing_only or i.status == "passing")]
    return indexed_json(filtered(request, entries, HEALTH_FIELDS), index)


async def health_checks(request: web.Request) -> web.Response:
    """``GET /v1/health/checks/<name>``: every check of the service's instances."""
    ctx = request.app[CONTEXT]
    await wait_for_change(request)
    instances, index = await ctx.registry.instances(request.match_info["name"])
    entries = [check_entry(i, c) for i in instances for c in i.checks]
    return indexed_json(filtered(request, entries, CHECK_FIELDS), index)


async def health_state(request: web.Request) -> web.Response:
    """``GET /v1/health/state/<state>``: checks in one state (``any`` for all)."""
    ctx = request.app[CONTEXT]
    state = request.match_info["state"]
    if state != "any" and state not in CHECK_STATUSES:
        raise web.HTTPBadRequest(text=f"Invalid state {state!r}: use any, passing, warning "
                                      "or critical")
    await wait_for_change(request)
    instances, index = await ctx.registry.instances()
    entries = [check_entry(i, c) for i in instances for c in i.checks
               if state == "any" or c.status == state]
    return indexed_json(filtered(request, entries, CHECK_FIELDS), index)


def add_routes(app: web.Application) -> None:
    app.router.add_put("/v1/agent/check/{verb:pass|warn|fail}/{check_id}", check_verb)
    app.router.add_put("/v1/agent/check/update/{check_id}", check_update)
    app.router.add_get("/v1/agent/checks", agent_checks)
    app.router.add_get("/v1/health/service/{name}", health_service)
    app.router.add_get("/v1/health/checks/{name}", health_checks)
    app.router.add_get("/v1/health/state/{state}", health_state)
    app.on_startup.append(_start_checks)
    app.on_cleanup.append(_stop_checks)


async def _start_checks(app: web.Application) -> None:
    app[CONTEXT].health.start()


async def _stop_checks(app: web.Application) -> None:
    await app[CONTEXT].health.close()
