"""The configurator's REST API (aiohttp).

    GET    /v1/config/<path>   the value there (the whole document without a path)
    POST   /v1/config/<path>   merge an object into the object there, or append to the
                               array there (405 on a scalar)
    PUT    /v1/config/<path>   replace the value there, or create it
    DELETE /v1/config/<path>   remove it
    PATCH  /v1/config          a JSON Patch (RFC 6902) on the document
    GET    /v1/render          the last rendered output (?template=N, 0 by default)
    POST   /v1/render          render and check a document (the body; the stored one
                               without a body) and return the output: a dry run

Every write is rendered and checked before it is committed: 400 with the
checker's output when the program refuses it, and nothing changes. Bad JSON is
``400 Bad request: ...``; other methods get 405.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from consulate.control.configurator import jsonpatch, paths
from consulate.control.configurator.engine import (
    CannotRender,
    CheckFailed,
    Configurator,
    EditConflict,
    InvalidConfig,
    ReloadFailed,
)
from consulate.control.configurator.stores import TOO_DEEP, StoreError, too_deep

log = logging.getLogger("consulate.configurator")

_CONFIGURATOR = web.AppKey("configurator", Configurator)
_TOO_DEEP_BODY = f"Bad request: the body {TOO_DEEP}: flatten it\n"


def _path(request: web.Request) -> list[str]:
    """The segments after /v1/config, each percent-decoded on its own, so that
    ``location%20%2F`` is the one key ``location /``."""
    raw = request.rel_url.raw_path.removeprefix("/v1/config")
    return [unquote(part) for part in raw.split("/") if part]


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message.rstrip("\n") + "\n")


def _json(value: Any) -> web.Response:
    return web.Response(text=json.dumps(value, indent=2) + "\n",
                        content_type="application/json")


async def _body(request: web.Request, *, required: bool = True) -> Any:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise web.HTTPBadRequest(text="Bad request: the body is empty; send a JSON value\n")
        return None
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(text=f"Bad request: the body is not JSON ({exc})\n") from None
    except RecursionError:  # deeper than the JSON parser itself goes
        raise web.HTTPBadRequest(text=_TOO_DEEP_BODY) from None
    if too_deep(document):
        raise web.HTTPBadRequest(text=_TOO_DEEP_BODY)
    return document


async def _edit(request: web.Request, change: Callable[[Any], Any]) -> Any:
    configurator = request.app[_CONFIGURATOR]
    try:
        return await configurator.edit(change)
    except paths.PathNotFound as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    except paths.NotAContainer as exc:
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "PUT", "DELETE", "PATCH"],
                                       text=f"{exc}\n") from None
    except jsonpatch.PatchTestFailed as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    except (paths.PathError, jsonpatch.PatchError, InvalidConfig) as exc:
        raise web.HTTPBadRequest(text=f"Bad request: {exc}\n") from None
    except CheckFailed as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    except (CannotRender, StoreError) as exc:
        raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
    except EditConflict as exc:
        raise web.HTTPConflict(text=f"{exc}\n") from None
    except ReloadFailed as exc:
        raise web.HTTPInternalServerError(text=f"committed, but {exc}\n") from None


async def get_config(request: web.Request) -> web.Response:
    try:
        document = (await request.app[_CONFIGURATOR].store.load()).document
        return _json(paths.get(document, _path(request)))
    except paths.PathNotFound as exc:
        return _text(404, str(exc))
    except StoreError as exc:
        return _text(503, str(exc))


async def post_config(request: web.Request) -> web.Response:
    path, value = _path(request), await _body(request)
    document = await _edit(request, lambda d: paths.post(d, path, value))
    return _json(paths.get(document, path))


async def put_config(request: web.Request) -> web.Response:
    path, value = _path(request), await _body(request)
    await _edit(request, lambda d: paths.put(d, path, value))
    return _json(value)


async def delete_config(request: web.Request) -> web.Response:
    path = _path(request)
    await _edit(request, lambda d: paths.delete(d, path))
    return web.Response(status=204)


async def patch_config(request: web.Request) -> web.Response:
    path, patch = _path(request), await _body(request)
    if path:
        return _text(400, "Bad request: PATCH applies to the whole document: send it to "
                          "/v1/config with JSON Pointers from the root")
    return _json(await _edit(request, lambda d: jsonpatch.apply_patch(d, patch)))


def _template_index(request: web.Request, count: int) -> int:
    text = request.query.get("template", "0")
    if not (text.isascii() and text.isdigit()) or int(text) >= count:
        raise web.HTTPBadRequest(text=f"Bad request: template {text!r}: use 0 to {count - 1}\n")
    return int(text)


async def get_render(request: web.Request) -> web.Response:
    configurator = request.app[_CONFIGURATOR]
    output = configurator.last_output[_template_index(request, len(configurator.templates))]
    if output is None:
        return _text(404, "nothing rendered yet: PUT a configuration to /v1/config")
    return web.Response(text=output)


async def post_render(request: web.Request) -> web.Response:
    configurator = request.app[_CONFIGURATOR]
    index = _template_index(request, len(configurator.templates))
    document = await _body(request, required=False)
    try:
        if document is None:
            document = (await configurator.store.load()).document
        rendered = await configurator.dry_run(document)
    except InvalidConfig as exc:
        return _text(400, f"Bad request: {exc}")
    except CheckFailed as exc:
        return _text(400, str(exc))
    except (CannotRender, StoreError) as exc:
        return _text(503, str(exc))
    return web.Response(text=rendered[index].text)


async def serve_api(configurator: Configurator, port: int) -> web.AppRunner:
    """The API listening on 127.0.0.1:``port``; ``cleanup()`` the runner to stop it."""
    runner = web.AppRunner(build_app(configurator), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("event=listen component=configurator address=127.0.0.1:%d", port)
    return runner


def build_app(configurator: Configurator) -> web.Application:
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app[_CONFIGURATOR] = configurator
    for route in ("/v1/config", "/v1/config/{path:.*}"):
        resource = app.router.add_resource(route)
        resource.add_route("GET", get_config)
        resource.add_route("POST", post_config)
        resource.add_route("PUT", put_config)
        resource.add_route("DELETE", delete_config)
        resource.add_route("PATCH", patch_config)
    render = app.router.add_resource("/v1/render")
    render.add_route("GET", get_render)
    render.add_route("POST", post_render)
    return app
