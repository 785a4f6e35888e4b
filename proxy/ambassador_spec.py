"""Ambassador backend specs, and the per-port rules a container declares: pure parsing.

A container asks for its connections to the agent's port ``<port>`` to go
somewhere with an environment variable ``BACKEND_<port>=<spec>`` (Ambassadord)
or a label ``connect.<port>=<spec>`` (Connectable); ``consulate ambassador
<spec>`` routes every connection by one spec. A spec is one of:

    10.0.0.5:6379,10.0.0.6:6379      a static list of host:port, round robin
    redis                            a service name: its live endpoints in the registry
    consul://HOST:PORT/KEY           a Consul KV key (consulate's agent serves the same API)
    etcd://HOST:PORT[,HOST:PORT]/KEY an etcd v3 key (the key is ``/KEY``)

A KV key holds a spec itself, as plain text: a static list or a service name
(``10.0.0.5:80,10.0.0.6:80`` or ``web``), never another KV key. It is watched,
so writing a new value moves the connections made from then on.

Every bad spec raises ``BadSpec`` whose message shows the spec, the part that is
wrong and what to write instead: it reaches the log line of a refused
connection, or the user of ``consulate ambassador``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

FORMS = ("host:port[,host:port...], a service name, consul://HOST:PORT/KEY or "
         "etcd://HOST:PORT[,HOST:PORT...]/KEY")
ENV_PREFIX = "BACKEND_"  # Ambassadord
LABEL_PREFIX = "connect."  # Connectable
# A host name (RFC 1123 labels) or a service name as the registry keeps them.
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_KV_SCHEMES = ("consul", "etcd")


class BadSpec(ValueError):
    """A spec that cannot route anything; the message names the part and the fix."""


@dataclass(frozen=True)
class Target:
    """One host:port of a static list (what proxy/balance.py's balancers pick from)."""

    address: str
    port: int
    weight: int = 1


@dataclass(frozen=True)
class StaticSpec:
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class ServiceSpec:
    name: str


@dataclass(frozen=True)
class KvSpec:
    """``scheme`` is consul or etcd; ``key`` as that store names it (etcd's starts
    with ``/``, Consul's does not)."""

    scheme: str
    endpoints: tuple[tuple[str, int], ...]
    key: str

    @property
    def uri(self) -> str:
        members = ",".join(f"{host}:{port}" for host, port in self.endpoints)
        return f"{self.scheme}://{members}/{self.key.lstrip('/')}"


Spec = StaticSpec | ServiceSpec | KvSpec
RouteSpec = StaticSpec | ServiceSpec  # what a KV value may hold


def parse_spec(text: str) -> Spec:
    """The spec ``text`` names, or BadSpec."""
    spec = text.strip()
    if not spec:
        raise BadSpec(f"backend spec {text!r} is empty: give {FORMS}")
    if "://" in spec:
        return _parse_kv(spec)
    if ":" in spec or "," in spec:
        return StaticSpec(tuple(_parse_target(spec, part) for part in spec.split(",")))
    if spec.replace(".", "").isdigit():
        raise BadSpec(f"backend spec {text!r} is an address without a port: write it as "
                      f"{spec}:PORT")
    if not _SERVICE_NAME.match(spec):
        raise BadSpec(f"backend spec {text!r} is not a service name (letters, digits, '-', "
                      f"'_' and '.', up to 128) nor any of {FORMS}")
    return ServiceSpec(spec)


def parse_kv_value(raw: bytes, where: str) -> RouteSpec:
    """The spec a KV key holds; ``where`` names the key for the message."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise BadSpec(f"{where} does not hold UTF-8 text: write a spec such as "
                      "10.0.0.5:80,10.0.0.6:80 or a service name") from None
    if not text.strip():
        raise BadSpec(f"{where} is empty: write a spec such as 10.0.0.5:80,10.0.0.6:80 "
                      "or a service name")
    spec = parse_spec(text)
    if isinstance(spec, KvSpec):
        raise BadSpec(f"{where} holds {text.strip()!r}: a KV value must be "
                      "host:port[,host:port...] or a service name, not another KV key")
    return spec


def _parse_target(spec: str, part: str) -> Target:
    host, sep, port = part.strip().rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not (
            0 < int(port) < 65536):
        raise BadSpec(f"backend spec {spec!r}: {part.strip()!r} is not host:port with a "
                      "port from 1 to 65535 (for example 10.0.0.5:6379)")
    _check_host(spec, host)
    return Target(host, int(port))


def _check_host(spec: str, host: str) -> None:
    try:
        ipaddress.IPv4Address(host)
        return
    except ValueError:
        pass
    if host.replace(".", "").isdigit() or not _HOST_NAME.match(host):
        raise BadSpec(f"backend spec {spec!r}: {host!r} is neither an IPv4 address nor a "
                      "host name")


def _parse_kv(spec: str) -> KvSpec:
    try:
        parts = urlsplit(spec)
    except ValueError as exc:  # an unclosed [ of an IPv6 address
        raise BadSpec(f"backend spec {spec!r}: {exc}: use {FORMS}") from None
    if parts.scheme not in _KV_SCHEMES:
        raise BadSpec(f"backend spec {spec!r}: the scheme {parts.scheme + '://'!r} is "
                      "unknown: use consul:// or etcd://")
    if not parts.netloc:
        raise BadSpec(f"backend spec {spec!r} names no HOST:PORT: write it as "
                      f"{parts.scheme}://127.0.0.1:{_default_port(parts.scheme)}/KEY")
    members = parts.netloc.split(",")
    if parts.scheme == "consul" and len(members) > 1:
        raise BadSpec(f"backend spec {spec!r}: a Consul agent is one HOST:PORT "
                      "(for example consul://127.0.0.1:8500/KEY)")
    endpoints = tuple((t.address, t.port) for t in (_parse_target(spec, m) for m in members))
    key = parts.path.strip("/")
    if not key or parts.query or parts.fragment:
        raise BadSpec(f"backend spec {spec!r} names no key: add one, as in "
                      f"{parts.scheme}://{parts.netloc}/ambassador/redis")
    return KvSpec(parts.scheme, endpoints, "/" + key if parts.scheme == "etcd" else key)


def _default_port(scheme: str) -> int:
    return 8500 if scheme == "consul" else 2379


@dataclass(frozen=True)
class Rules:
    """A container's specs by port, and what it declared that could not be read."""

    specs: Mapping[int, str]
    problems: tuple[str, ...] = ()


def container_rules(env: Iterable[str], labels: Mapping[str, str]) -> Rules:
    """``BACKEND_<port>`` variables and ``connect.<port>`` labels, by port.

    A label wins over a variable for the same port, as registrator lets labels
    override ``SERVICE_*`` variables. The specs stay text: they are parsed when a
    connection uses them, so the refusal names the spec that is wrong.
    """
    specs: dict[int, str] = {}
    problems: list[str] = []
    declared = [(f"variable {name}", name.removeprefix(ENV_PREFIX), value)
                for name, _, value in (item.partition("=") for item in env)
                if name.startswith(ENV_PREFIX)]
    declared += [(f"label {name}", name.removeprefix(LABEL_PREFIX), value)
                 for name, value in sorted(labels.items()) if name.startswith(LABEL_PREFIX)]
    for origin, port, value in declared:
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            problems.append(f"{origin}: {port!r} is not a port from 1 to 65535 (write "
                            f"{ENV_PREFIX}6379=... or {LABEL_PREFIX}6379=...)")
            continue
        specs[int(port)] = value
    return Rules(specs, tuple(problems))
