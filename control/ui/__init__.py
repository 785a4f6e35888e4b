"""The web UI, served by the agent at ``/ui/`` on its HTTP server.

Plain HTML, CSS and JavaScript shipped as package data (``static/``): nothing to
build, nothing fetched from the network. The page reads the agent's own API
(catalog, health, routes, KV, ``/v1/agent/self``) and follows the catalog live
through ``GET /v1/internal/ui/events`` (feed.py says why one stream), the path
Consul's own UI endpoints live under.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from aiohttp import web

from consulate.control.registry.backend import RegistryBackend
from consulate.control.registry.model import RegistryError
from consulate.control.ui.feed import CatalogFeed, UiEvent, sse_frame, sse_preamble

STATIC = Path(__file__).parent / "static"
EVENTS_PATH = "/v1/internal/ui/events"
_NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate: an upgraded agent serves new files

# The open event streams, ended when the server shuts down (a quiet stream would
# otherwise hold the shutdown until its grace time runs out).
_STREAMS = web.AppKey("ui_streams", set[asyncio.Timeout])


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers=_NO_CACHE)


async def _to_index(request: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect("/ui/")


class _Events:
    """``GET /v1/internal/ui/events``: the catalog as Server-Sent Events, a
    snapshot, then instance changes, for as long as the browser stays."""

    def __init__(self, registry: RegistryBackend) -> None:
        self.registry = registry

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "X-Accel-Buffering": "no", **_NO_CACHE})
        await response.prepare(request)
        await response.write(sse_preamble())
        feed = CatalogFeed()
        streams = request.app[_STREAMS]
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            async with asyncio.timeout(None) as closing:
                streams.add(closing)
                try:
                    async for change in self.registry.watch():
                        for event in feed.apply(change):
                            await response.write(sse_frame(event))
                except RegistryError as exc:  # the browser shows it, then reconnects
                    event = UiEvent("unavailable", {"Error": str(exc)})
                    await response.write(sse_frame(event))
                finally:
                    streams.discard(closing)
        return response


async def _end_streams(app: web.Application) -> None:
    now = asyncio.get_running_loop().time()
    streams = app[_STREAMS]
    for closing in list(streams):  # each one leaves the set as it ends
        closing.reschedule(now)


def add_routes(app: web.Application, registry: RegistryBackend) -> None:
    """Serve the UI and its event stream on ``app`` (the agent's HTTP server)."""
    app[_STREAMS] = set()
    app.on_shutdown.append(_end_streams)
    app.router.add_get("/ui", _to_index)
    app.router.add_get("/ui/", _index)
    app.router.add_static("/ui/static/", STATIC, append_version=False)
    app.router.add_get(EVENTS_PATH, _Events(registry).stream)
