"""``GET /v1/agent/routes``: this agent's route table, as its proxy and DNS use it.

The catalog says what is registered; the route table is what this host routes
by (one VIP per service, the endpoints the proxy picks from), which is what an
operator checks when a name does not reach what it should (``consulate routes``,
kube-proxy's and Envoy's ``/clusters`` serve the same purpose).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from consulate.proxy.table import RouteTable


def routes_json(table: RouteTable) -> list[dict[str, Any]]:
    """The table in the Consul API's style (CamelCase), services by name, endpoints
    by id (the table's own order)."""
    return [
        {"Service": service.name, "VIP": str(service.vip),
         "Endpoints": [{"ID": e.id, "Address": e.address, "Port": e.port, "Node": e.node,
                        "Weight": e.weight, "Tags": list(e.tags)}
                       for e in service.endpoints]}
        for service in table.services()
    ]


def add_routes(app: web.Application, table: RouteTable) -> None:
    async def routes(request: web.Request) -> web.Response:
        return web.json_response(routes_json(table),
                                 headers={"X-Consul-Index": str(table.version)})

    app.router.add_get("/v1/agent/routes", routes)
