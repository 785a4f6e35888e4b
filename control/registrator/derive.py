"""A container's services, derived as gliderlabs/registrator documents it (pure, no I/O).

Input is the container's inspect data (``GET /containers/<id>/json``, as the
Docker SDK returns it); output is the services to register and registrator's
``ignored:`` lines. The rules, from registrator's services.md and run.md:

- Ports: every ExposedPorts entry, overlaid with the published bindings of
  NetworkSettings.Ports (the first binding of each). A port without a host port
  is skipped ("not published on host") unless ``-internal``.
- Metadata: env and labels named ``SERVICE_<KEY>`` or ``SERVICE_<port>_<KEY>``
  (keys lower-cased); env wins over labels and the port-specific key over the
  general one. ``name``, ``id``, ``tags`` and ``ignore`` steer the derivation;
  every other key is an attribute.
- Name: SERVICE_NAME, else the image's base name without tag (none at all with
  ``-explicit``); with several ports, ``-<exposed port>`` is appended unless the
  name came from a port-specific key.
- ID: ``<hostname>:<container-name>:<exposed port>`` plus ``:udp`` for UDP,
  unless SERVICE_ID.
- Address: the published host IP and port (``0.0.0.0`` means this host's IP,
  ``-ip`` overrides both), or with ``-internal`` the container's IP and exposed
  port; ``-useIpFromLabel`` takes the IP from a label (a ``/prefix`` is cut).
- Tags: SERVICE_TAGS, then ``-tags``, then ``udp`` for UDP ports; comma lists
  where ``\\,`` is a literal comma.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from consulate.control.registrator.model import Origin, Service, short_id

ANY_ADDRESS = "0.0.0.0"
_UNESCAPED_COMMA = re.compile(r"(?<!\\),")
_STEERING_KEYS = ("id", "name", "tags")


@dataclass(frozen=True)
class DeriveOptions:
    """The registrator flags that shape services, plus this host's identity.

    ``host_ip`` is what a binding on 0.0.0.0 becomes: registrator resolves the
    hostname to find it; the caller does that I/O and passes the result ("" when
    the name does not resolve, and 0.0.0.0 is then registered as it is).
    """

    hostname: str
    host_ip: str = ""
    ip: str = ""
    internal: bool = False
    explicit: bool = False
    use_ip_from_label: str = ""
    tags: str = ""
    ttl: int = 0


@dataclass(frozen=True)
class Derivation:
    """The services of one container, and the lines registrator logs about it."""

    services: tuple[Service, ...]
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class _Port:
    exposed: str
    port_type: str
    host_ip: str
    host_port: str


def split_tags(text: str) -> list[str]:
    """A comma-separated tag list; ``\\,`` is a comma inside a tag; empty items drop."""
    return [part.replace("\\,", ",") for part in _UNESCAPED_COMMA.split(text) if part]


def service_metadata(env: list[str] | None, labels: Mapping[str, str] | None,
                     port: str) -> tuple[dict[str, str], set[str]]:
    """The SERVICE_* keys that apply to ``port`` and the keys set for that port alone."""
    merged = dict(labels or {})
    for item in env or ():
        key, sep, value = item.partition("=")
        if sep:
            merged[key] = value
    general: dict[str, str] = {}
    specific: dict[str, str] = {}
    for key, value in merged.items():
        if not key.startswith("SERVICE_"):
            continue
        rest = key.removeprefix("SERVICE_").lower()
        head, sep, tail = rest.partition("_")
        if head.isdigit() and sep:
            if head == port:
                specific[tail] = value
        else:
            general[rest] = value
    return {**general, **specific}, set(specific)


def image_base_name(image: str) -> str:
    """``gliderlabs/foobar:1.2`` -> ``foobar``: the default service name."""
    base = image.rstrip("/").rsplit("/", 1)[-1] or "."
    return base.split(":", 1)[0]


def derive(container: Mapping[str, Any], options: DeriveOptions) -> Derivation:
    """The services registrator registers for ``container`` (its inspect data)."""
    cid = short_id(container["Id"])
    ports = _ports(container)
    if not ports:
        return Derivation((), (f"ignored: {cid} no published ports",))
    notes: list[str] = []
    chosen = []
    for port in ports:
        if not options.internal and not port.host_port:
            notes.append(f"ignored: {cid} port {port.exposed} not published on host")
        else:
            chosen.append(port)
    services = []
    for port in chosen:
        service = _service(container, port, len(chosen) > 1, options, notes)
        if service is None:
            notes.append(f"ignored: {cid} service on port {port.exposed}")
        else:
            services.append(service)
    return Derivation(tuple(services), tuple(notes))


def _ports(container: Mapping[str, Any]) -> list[_Port]:
    """Exposed ports (bound to themselves, for host networking) overlaid with bindings."""
    config = container.get("Config") or {}
    settings = container.get("NetworkSettings") or {}
    found: dict[str, _Port] = {}
    for key in config.get("ExposedPorts") or {}:
        number, port_type = _split_port(key)
        found[key] = _Port(number, port_type, ANY_ADDRESS, number)
    for key, bindings in (settings.get("Ports") or {}).items():
        number, port_type = _split_port(key)
        first = (bindings or [{}])[0]
        found[key] = _Port(number, port_type, first.get("HostIp") or ANY_ADDRESS,
                           first.get("HostPort") or "")
    return sorted(found.values(), key=lambda p: (_as_int(p.exposed), p.port_type))


def _split_port(key: str) -> tuple[str, str]:
    number, _, port_type = key.partition("/")
    return number, port_type or "tcp"


def _as_int(text: str) -> int:
    """Go's Atoi as registrator uses it: 0 for anything that is not a number."""
    return int(text) if text.isascii() and text.isdigit() else 0


def _container_ip(settings: Mapping[str, Any]) -> str:
    """The container's own IP: the default bridge's, else its first network's."""
    if settings.get("IPAddress"):
        return str(settings["IPAddress"])
    networks = settings.get("Networks") or {}
    addresses = [networks[name].get("IPAddress") for name in sorted(networks)]
    return next((str(a) for a in addresses if a), "")


def _service(container: Mapping[str, Any], port: _Port, grouped: bool,
             options: DeriveOptions, notes: list[str]) -> Service | None:
    config = container.get("Config") or {}
    labels = config.get("Labels") or {}
    metadata, from_port = service_metadata(config.get("Env"), labels, port.exposed)
    if metadata.get("ignore"):
        return None
    name = metadata.get("name") or ""
    if not name:
        if options.explicit:
            return None
        name = image_base_name(config.get("Image") or "")
    if grouped and "name" not in from_port:
        name += f"-{port.exposed}"
    container_name = str(container.get("Name") or "").removeprefix("/")
    service_id = f"{options.hostname}:{container_name}:{port.exposed}"

    if options.internal:
        ip, number = _container_ip(container.get("NetworkSettings") or {}), port.exposed
    else:
        ip, number = port.host_ip, port.host_port
        if ip == ANY_ADDRESS and options.host_ip:
            ip = options.host_ip
        if options.ip:
            ip = options.ip
    if options.use_ip_from_label:
        labelled = labels.get(options.use_ip_from_label) or ""
        if labelled:
            ip = labelled.rsplit("/", 1)[0]
            notes.append(f"using container IP {ip} from label '{options.use_ip_from_label}'")
        else:
            notes.append(f"Label '{options.use_ip_from_label}' not found in container "
                         "configuration")

    tags = split_tags(metadata.get("tags") or "") + split_tags(options.tags)
    if port.port_type == "udp":
        tags.append("udp")
        service_id += ":udp"
    service_id = metadata.get("id") or service_id
    attrs = {k: v for k, v in metadata.items() if k not in _STEERING_KEYS}
    origin = Origin(container_id=str(container["Id"]), container_name=container_name,
                    container_hostname=str(config.get("Hostname") or ""),
                    exposed_port=port.exposed, port_type=port.port_type)
    return Service(id=service_id, name=name, ip=ip, port=_as_int(number), origin=origin,
                   tags=tuple(tags), attrs=attrs, ttl=options.ttl)
