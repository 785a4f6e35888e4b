"""Consul's service definition JSON <-> registry instances (pure, no I/O).

Keys are matched as Consul matches them: case-insensitively and with or without
underscores (``Name``, ``name``; ``EnableTagOverride``, ``enable_tag_override``),
so py-consul's lowercase bodies and hand-written ``curl`` bodies both work.
Every rejection says which field was wrong, what it held and what is expected.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from consulate.control.registry.model import Instance

# Consul's own limits on service metadata (agent/structs/structs.go).
META_MAX_PAIRS = 64
META_KEY_MAX = 128
META_VALUE_MAX = 512
_META_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# A service name must work as a DNS label: <name>.service.consul.
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0}

# Fields Consul accepts that this agent takes without acting on them yet.
_ACCEPTED_UNUSED = {"enabletagoverride", "kind", "taggedaddresses", "proxy",
                    "connect", "namespace", "partition", "token", "socketpath", "locality"}
_KNOWN = ({"id", "name", "tags", "address", "port", "meta", "check", "checks", "weights"}
          | _ACCEPTED_UNUSED)
WEIGHT_MAX = 65535  # a DNS SRV weight is 16 bits (RFC 2782)


class InvalidDefinition(ValueError):
    """The caller's service definition is unusable; the message says why and what to send."""


def parse_duration(text: str) -> float:
    """A Go duration string ("10s", "1m30s", "500ms") in seconds."""
    if not isinstance(text, str) or not text:
        raise InvalidDefinition(f"duration {text!r} is not a string like '10s' or '1m30s'")
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise InvalidDefinition(f"duration {text!r} is not a string like '10s' or '1m30s'")
    return total


def _normalized(body: dict[str, Any]) -> dict[str, Any]:
    return {key.lower().replace("_", ""): value for key, value in body.items()}


def _ttl_of(fields: dict[str, Any]) -> float | None:
    checks: list[Any] = []
    if fields.get("check"):
        checks.append(fields["check"])
    extra = fields.get("checks") or []
    if not isinstance(extra, list):
        raise InvalidDefinition(f"Checks must be a list of check objects, got {extra!r}")
    checks += extra
    ttls = []
    for check in checks:
        if not isinstance(check, dict):
            raise InvalidDefinition(f"a check must be an object like {{\"TTL\": \"10s\"}}, "
                                    f"got {check!r}")
        ttl = _normalized(check).get("ttl")
        if ttl:
            seconds = parse_duration(ttl)
            if seconds <= 0:
                raise InvalidDefinition(f"check TTL {ttl!r} must be longer than zero")
            ttls.append(seconds)
    return min(ttls) if ttls else None


def _weights_of(fields: dict[str, Any]) -> tuple[int, int]:
    """Consul's ``"Weights": {"Passing": N, "Warning": M}``; each defaults to 1."""
    weights = fields.get("weights")
    if weights is None:
        return 1, 1
    if not isinstance(weights, dict):
        raise InvalidDefinition(
            f"Weights must be an object like {{\"Passing\": 10, \"Warning\": 1}}, "
            f"got {weights!r}"
        )
    unknown = sorted(k for k in weights if k.lower().replace("_", "") not in
                     ("passing", "warning"))
    if unknown:
        raise InvalidDefinition(f"Weights has unknown field(s) {', '.join(unknown)}: "
                                "only Passing and Warning are known")
    given = _normalized(weights)
    chosen = []
    for label, lowest in (("Passing", 1), ("Warning", 0)):
        value = given.get(label.lower(), 1)
        if isinstance(value, bool) or not isinstance(value, int) or not (
                lowest <= value <= WEIGHT_MAX):
            raise InvalidDefinition(f"Weights.{label} {value!r} is invalid: give a whole "
                                    f"number from {lowest} to {WEIGHT_MAX}")
        chosen.append(value)
    return chosen[0], chosen[1]


def parse_registration(body: object, *, node: str, default_address: str) -> Instance:
    """The instance a ``PUT /v1/agent/service/register`` body describes."""
    if not isinstance(body, dict):
        raise InvalidDefinition(
            f"Request body must be a JSON object like {{\"Name\": \"web\", \"Port\": 80}}, "
            f"got {type(body).__name__}"
        )
    fields = _normalized(body)
    unknown = sorted(k for k in body if k.lower().replace("_", "") not in _KNOWN)
    if unknown:
        raise InvalidDefinition(
            f"Request decode failed: unknown field(s) {', '.join(unknown)}; "
            "known fields are ID, Name, Tags, Address, Port, Meta, Weights, Check, Checks"
        )
    name = fields.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidDefinition("Missing service name: set \"Name\" to the service's name")
    check_service_name(name)
    port = fields.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidDefinition(f"Port {port!r} is invalid: give a number from 1 to 65535")
    instance_id = fields.get("id") or name
    if not isinstance(instance_id, str) or "/" in instance_id:
        raise InvalidDefinition(f"ID {instance_id!r} must be a string without '/'")
    address = fields.get("address") or default_address
    check_ipv4(address, "give the instance's IP (or leave Address out to use the agent's)")
    tags = fields.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidDefinition(f"Tags must be a list of strings, got {tags!r}")
    meta = fields.get("meta") or {}
    check_meta(meta)
    weight, warning_weight = _weights_of(fields)
    return Instance(
        id=instance_id, name=name, address=str(address), port=port, tags=tuple(tags),
        meta=dict(meta), ttl=_ttl_of(fields), node=node, weight=weight,
        warning_weight=warning_weight,
    )


def check_service_name(name: str) -> None:
    """A service name must work as a DNS label: <name>.service.consul."""
    if not _SERVICE_NAME.match(name):
        raise InvalidDefinition(
            f"Name {name!r} cannot be used in DNS: use 1 to 63 letters, digits, '-' or '_', "
            "starting and ending with a letter or digit"
        )


def check_ipv4(address: object, advice: str) -> None:
    try:
        if not isinstance(address, str):  # IPv4Address() would take an int too
            raise ValueError(address)
        ipaddress.IPv4Address(address)
    except ValueError:
        raise InvalidDefinition(
            f"Address {address!r} is not an IPv4 address: the mesh routes to IPv4 endpoints, "
            f"{advice}"
        ) from None


def check_meta(meta: object) -> None:
    if not isinstance(meta, dict):
        raise InvalidDefinition(f"Meta must be an object of string values, got {meta!r}")
    if len(meta) > META_MAX_PAIRS:
        raise InvalidDefinition(f"Meta has {len(meta)} pairs: at most {META_MAX_PAIRS} allowed")
    for key, value in meta.items():
        if not _META_KEY.match(key) or len(key) > META_KEY_MAX:
            raise InvalidDefinition(
                f"Meta key {key!r} is invalid: use up to {META_KEY_MAX} letters, digits, "
                "'-' or '_'"
            )
        if not isinstance(value, str) or len(value) > META_VALUE_MAX:
            raise InvalidDefinition(
                f"Meta value of {key!r} must be a string of at most {META_VALUE_MAX} characters"
            )


def agent_service(instance: Instance, *, datacenter: str) -> dict[str, Any]:
    """One value of ``GET /v1/agent/services`` (keyed by ID), with Consul's field names."""
    return {
        "ID": instance.id,
        "Service": instance.name,
        "Tags": list(instance.tags),
        "Meta": dict(instance.meta),
        "Port": instance.port,
        "Address": instance.address,
        "Weights": {"Passing": instance.weight, "Warning": instance.warning_weight},
        "EnableTagOverride": False,
        "Datacenter": datacenter,
    }


def catalog_entry(
    instance: Instance, *, node_address: str, datacenter: str
) -> dict[str, Any]:
    """One element of ``GET /v1/catalog/service/<name>``, with Consul's field names."""
    return {
        "ID": "",
        "Node": instance.node,
        "Address": node_address,
        "Datacenter": datacenter,
        "TaggedAddresses": {"lan": node_address, "wan": node_address},
        "NodeMeta": {},
        "ServiceKind": "",
        "ServiceID": instance.id,
        "ServiceName": instance.name,
        "ServiceTags": list(instance.tags),
        "ServiceAddress": instance.address,
        "ServiceWeights": {"Passing": instance.weight, "Warning": instance.warning_weight},
        "ServiceMeta": dict(instance.meta),
        "ServicePort": instance.port,
        "ServiceEnableTagOverride": False,
        "CreateIndex": instance.create_index,
        "ModifyIndex": instance.modify_index,
    }
