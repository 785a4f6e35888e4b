"""What the registrator registers: one service per container port (registrator's model).

A container listening on several ports is several services. The ID encodes where
a service runs, ``<hostname>:<container-name>:<exposed-port>[:udp]``, which is
how a registrator recognises, after a restart, the registrations it made before
(``-cleanup``) without any state of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# registrator's own pattern: host, container name (Docker's name rules), port, udp.
_OWN_ID = re.compile(r"^(.+?):([a-zA-Z0-9][a-zA-Z0-9_.-]+):[0-9]+(?::udp)?$")


@dataclass(frozen=True)
class Origin:
    """Where a service comes from: the container and the port it was derived from."""

    container_id: str
    container_name: str  # without Docker's leading "/"
    container_hostname: str
    exposed_port: str
    port_type: str  # "tcp" or "udp"


@dataclass(frozen=True)
class Service:
    """registrator's Service object; ``attrs`` are the SERVICE_* keys left over.

    ``ttl`` is the ``-ttl`` flag in seconds (0: no expiry) for the stores that
    support expiry.
    """

    id: str
    name: str
    ip: str
    port: int
    origin: Origin
    tags: tuple[str, ...] = ()
    attrs: dict[str, str] = field(default_factory=dict)
    ttl: int = 0


def short_id(container_id: str) -> str:
    """The 12-character container id that Docker and registrator print."""
    return container_id[:12]


def is_own_id(service_id: str, hostname: str) -> bool:
    """True when ``service_id`` has registrator's shape and names ``hostname``.

    IDs set with SERVICE_ID do not have that shape: as in registrator, -cleanup
    never touches them.
    """
    match = _OWN_ID.match(service_id)
    return match is not None and match.group(1) == hostname
