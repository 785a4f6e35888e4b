"""The proxy's log lines that both relays write alike (key=value, one per event).

The Python relay writes them as things happen; the native engine reports the
same events (native/relay.c) and proxy/engine_link.py writes them from there, so
an operator reads one vocabulary whichever relay runs. Envoy's outlier-event
fields name the ejections.
"""

from __future__ import annotations

import logging

from consulate.proxy.limits import Episode, cleared_line, reached_line
from consulate.proxy.outlier import Ejection
from consulate.proxy.table import RouteTable

log = logging.getLogger("consulate.proxy")


def endpoint_id(table: RouteTable, service: str, address: str, port: int) -> str:
    """The id of a service's endpoint at ``address:port`` ("?" once it left the table)."""
    found = table.service(service)
    for endpoint in found.tcp_endpoints if found is not None else ():
        if (endpoint.address, endpoint.port) == (address, port):
            return endpoint.id
    return "?"


def ejected(table: RouteTable, service: str, ejection: Ejection[tuple[str, int]]) -> None:
    address, port = ejection.key
    log.warning("event=eject service=%s endpoint=%s address=%s:%d "
                "type=consecutive_connect_failure failures=%d num_ejections=%d "
                "ejection_time=%.3f", service, endpoint_id(table, service, address, port),
                address, port, ejection.failures, ejection.ejections, ejection.seconds)


def returned(table: RouteTable, service: str, address: str, port: int) -> None:
    log.info("event=uneject service=%s endpoint=%s address=%s:%d", service,
             endpoint_id(table, service, address, port), address, port)


def limit_reached(episode: Episode) -> None:
    log.warning(reached_line(episode))


def limit_cleared(episode: Episode, now: float) -> None:
    log.warning(cleared_line(episode, now))
