"""The scheduler's HTTP endpoints on the agent's API, on Nomad's paths:

    PUT|POST /v1/jobs                   a job file, JSON or TOML (Content-Type
                                        application/toml, or anything not starting with {)
    GET      /v1/jobs                   every job with its status
    GET      /v1/job/<name>             ``nomad job status`` as JSON
    DELETE   /v1/job/<name>             stop the job (its allocations are stopped)
    GET      /v1/allocation/<id>        an allocation with its history (id or unique prefix)
    GET      /v1/allocation/<id>/explain   why it went where it went
    GET      /v1/nodes                  the nodes and what they have left

Any agent answers: when another one leads, the call goes to it over duplex.
Errors are plain text as on the rest of the API: 400 names the bad field of a
job file, 404 an unknown job or allocation, 503 no leader to answer.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from consulate.control import duplex
from consulate.control.scheduler.host import SchedulerHost
from consulate.control.scheduler.operations import operate

MAX_JOB_FILE = 1024 * 1024
FORWARD_TIMEOUT = 8.0  # below the CLI's 10 s: it hears why, not a timeout


class _Handlers:
    def __init__(self, host: SchedulerHost) -> None:
        self.host = host

    async def _reply(self, op: str, arg: Any) -> web.Response:
        if self.host.forwarding():
            try:
                status, body = await self.host.node_agent.peer.call(
                    "scheduler.api", op, arg, timeout=FORWARD_TIMEOUT)
            except (duplex.DuplexError, TimeoutError) as exc:
                raise web.HTTPServiceUnavailable(
                    text=f"the scheduler leader does not answer ({exc}): retry when a "
                         "leader is elected") from None
        else:
            status, body = await operate(self.host, op, arg)
        if status != 200:
            raise _error(status, body)
        return web.json_response(body)

    async def submit(self, request: web.Request) -> web.Response:
        body = await request.read()
        if len(body) > MAX_JOB_FILE:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_JOB_FILE, actual_size=len(body),
                                                text=f"job file exceeds {MAX_JOB_FILE} bytes")
        kind = "toml" if request.content_type in ("application/toml", "text/x-toml") else "auto"
        return await self._reply("submit", (body, kind))

    async def jobs(self, request: web.Request) -> web.Response:
        return await self._reply("jobs", None)

    async def job(self, request: web.Request) -> web.Response:
        return await self._reply("job", request.match_info["name"])

    async def stop(self, request: web.Request) -> web.Response:
        return await self._reply("stop", request.match_info["name"])

    async def allocation(self, request: web.Request) -> web.Response:
        return await self._reply("allocation", request.match_info["id"])

    async def explain(self, request: web.Request) -> web.Response:
        return await self._reply("explain", request.match_info["id"])

    async def nodes(self, request: web.Request) -> web.Response:
        return await self._reply("nodes", None)


def _error(status: int, text: str) -> web.HTTPException:
    kinds: dict[int, type[web.HTTPException]] = {400: web.HTTPBadRequest,
                                                 404: web.HTTPNotFound}
    return kinds.get(status, web.HTTPServiceUnavailable)(text=text)


def add_routes(app: web.Application, host: SchedulerHost | None) -> None:
    """The routes above; without a host (the agent runs without --scheduler) each
    answers 503 and says how to turn the scheduler on."""
    if host is None:
        for path in PATHS:
            app.router.add_route("*", path, _disabled)
        return
    handlers = _Handlers(host)
    app.router.add_put("/v1/jobs", handlers.submit)
    app.router.add_post("/v1/jobs", handlers.submit)
    app.router.add_get("/v1/jobs", handlers.jobs)
    app.router.add_get("/v1/job/{name}", handlers.job)
    app.router.add_delete("/v1/job/{name}", handlers.stop)
    app.router.add_get("/v1/allocation/{id}", handlers.allocation)
    app.router.add_get("/v1/allocation/{id}/explain", handlers.explain)
    app.router.add_get("/v1/nodes", handlers.nodes)


PATHS = ("/v1/jobs", "/v1/job/{name}", "/v1/allocation/{id}", "/v1/allocation/{id}/explain",
         "/v1/nodes")


async def _disabled(request: web.Request) -> web.Response:
    raise web.HTTPServiceUnavailable(text="this agent does not run the scheduler: start it "
                                          "with --scheduler (CONSULATE_SCHEDULER=1)")
