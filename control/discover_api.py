"""Discoverd's HTTP API, beside the Consul-compatible one on the agent's server.

    PUT    /v1/discover/services/<name>/instances/<id>   register, or heartbeat
    DELETE /v1/discover/services/<name>/instances/<id>
    GET    /v1/discover/services/<name>/instances        list; ?index=&wait= long poll;
                                                         Accept: text/event-stream
    GET    /v1/discover/services/<name>/leader           the leader; SSE too

As in Discoverd, an instance is an address with attributes, registered with a
TTL (10 s unless the body says otherwise) and kept alive by PUTting it again
every TTL/2; a PUT that changes nothing only renews it, so watchers see no
event. Instances are listed oldest first: the first one is the leader. Streams
send Server-Sent Events named after the event kinds (up, update, down, current,
leader) with the instance as JSON data.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from aiohttp import web

from consulate.control.blocking import blocking_query
from consulate.control.registry.backend import RegistryBackend
from consulate.control.registry.events import ServiceEvent
from consulate.control.registry.hub import WatchHub
from consulate.control.registry.model import Instance, UnknownInstance
from consulate.control.service_definition import (
    InvalidDefinition,
    check_ipv4,
    check_meta,
    check_service_name,
    parse_duration,
)

DEFAULT_TTL = 10.0  # seconds, Discoverd's
_BODY_FIELDS = {"addr", "proto", "meta", "tags", "ttl"}
_PROTOS = ("tcp", "udp")


def instance_json(instance: Instance) -> dict[str, Any]:
    """An instance as Discoverd shows it (its index is its registration's)."""
    return {
        "id": instance.id,
        "service": instance.name,
        "addr": f"{instance.address}:{instance.port}",
        "proto": "udp" if "udp" in instance.tags else "tcp",
        "tags": list(instance.tags),
        "meta": dict(instance.meta),
        "index": instance.create_index,
    }


def parse_instance(name: str, instance_id: str, body: object, node: str) -> Instance:
    """The instance a PUT body describes; InvalidDefinition says what is wrong."""
    check_service_name(name)
    if not instance_id or "/" in instance_id or len(instance_id) > 128:
        raise InvalidDefinition(f"instance id {instance_id!r}: use 1 to 128 characters, no '/'")
    if not isinstance(body, dict):
        raise InvalidDefinition('body must be a JSON object like {"addr": "10.0.0.5:8080"}')
    unknown = sorted(set(body) - _BODY_FIELDS)
    if unknown:
        raise InvalidDefinition(f"unknown field(s) {', '.join(unknown)}; known fields are "
                                f"{', '.join(sorted(_BODY_FIELDS))}")
    addr = body.get("addr")
    host, sep, port_text = addr.rpartition(":") if isinstance(addr, str) else ("", "", "")
    if not sep or not (port_text.isascii() and port_text.isdigit()
                       and 1 <= int(port_text) <= 65535):
        raise InvalidDefinition(f"addr {addr!r} must be IP:PORT with a port from 1 to 65535")
    check_ipv4(host, "give the instance's IP")
    proto = body.get("proto", "tcp")
    if proto not in _PROTOS:
        raise InvalidDefinition(f"proto {proto!r} must be tcp or udp")
    meta = body.get("meta") or {}
    check_meta(meta)
    tags = body.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidDefinition(f"tags must be a list of strings, got {tags!r}")
    if proto == "udp" and "udp" not in tags:
        tags = [*tags, "udp"]
    ttl_text = body.get("ttl")
    ttl = DEFAULT_TTL if ttl_text is None else parse_duration(ttl_text)
    if ttl <= 0:
        raise InvalidDefinition(f"ttl {ttl_text!r} must be above zero, like \"10s\"")
    return Instance(id=instance_id, name=name, address=host, port=int(port_text),
                    tags=tuple(tags), meta=dict(meta), ttl=ttl, node=node)


class _Discover:
    """The handlers, with what they need from the agent."""

    def __init__(self, registry: RegistryBackend, hub: WatchHub, node: str) -> None:
        self.registry = registry
        self.hub = hub
        self.node = node

    async def put_instance(self, request: web.Request) -> web.Response:
        name, instance_id = request.match_info["name"], request.match_info["id"]
        try:
            body = json.loads(await request.read() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise web.HTTPBadRequest(text=f"invalid JSON body: {exc}") from None
        except RecursionError:
            raise web.HTTPBadRequest(text="invalid JSON body: nested too deeply") from None
        try:
            instance = parse_instance(name, instance_id, body, self.node)
        except InvalidDefinition as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        held = await self.registry.get(instance_id)
        if held is not None and held.name != name:  # ids are unique across services
            raise web.HTTPConflict(text=f"instance id {instance_id!r} belongs to service "
                                        f"{held.name!r}: deregister it there or pick another id")
        stored = await self.registry.register(instance)
        return web.json_response(instance_json(stored))

    async def delete_instance(self, request: web.Request) -> web.Response:
        name, instance_id = request.match_info["name"], request.match_info["id"]
        held = await self.registry.get(instance_id)
        if held is None or held.name != name:
            raise web.HTTPNotFound(text=f"service {name!r} has no instance {instance_id!r}: "
                                        f"GET /v1/discover/services/{name}/instances lists them")
        with contextlib.suppress(UnknownInstance):  # expired meanwhile: as wanted anyway
            await self.registry.deregister(instance_id)
        return web.Response()

    async def instances(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if _wants_stream(request):
            return await self._stream(request, name, kinds=None)
        query = blocking_query(request)
        if query is not None:
            await self.hub.wait(name, *query)
        instances, index = self.hub.instances(name)
        return _json([instance_json(i) for i in instances], index)

    async def leader(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if _wants_stream(request):
            return await self._stream(request, name, kinds={"leader"})
        instances, index = self.hub.instances(name)
        if not instances:
            raise web.HTTPNotFound(text=f"service {name!r} has no live instance, so no leader")
        return _json(instance_json(instances[0]), index)

    async def _stream(self, request: web.Request, name: str,
                      kinds: set[str] | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        async for event in self.hub.subscribe(name):
            if kinds is None or event.kind in kinds:
                await response.write(sse_frame(event))
        return response  # the hub closed, or this subscriber fell behind: reconnect


def sse_frame(event: ServiceEvent) -> bytes:
    """One Server-Sent Event: the kind as its name, the instance (or null) as data."""
    data = json.dumps(instance_json(event.instance) if event.instance else None)
    return f"id: {event.index}\nevent: {event.kind}\ndata: {data}\n\n".encode()


def _wants_stream(request: web.Request) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


def _json(data: object, index: int) -> web.Response:
    return web.json_response(data, headers={"X-Discoverd-Index": str(index),
                                            "X-Consul-Index": str(index)})


def add_routes(app: web.Application, registry: RegistryBackend, hub: WatchHub,
               node: str) -> None:
    """Serve the Discoverd API on ``app`` (the agent's HTTP server)."""
    handlers = _Discover(registry, hub, node)
    base = "/v1/discover/services/{name}"
    app.router.add_put(base + "/instances/{id}", handlers.put_instance)
    app.router.add_delete(base + "/instances/{id}", handlers.delete_instance)
    app.router.add_get(base + "/instances", handlers.instances)
    app.router.add_get(base + "/leader", handlers.leader)
