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

from consulate.control.registry.model import CHECK_STATUSES, CheckKind, HealthCheck, Instance

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
# Consul's check limits: probes at most once a second, 10 s timeout by default.
MIN_CHECK_INTERVAL = 1.0
DEFAULT_CHECK_TIMEOUT = 10.0
_CHECK_FIELDS = {"checkid", "id", "name", "notes", "ttl", "http", "tcp", "args",
                 "scriptargs", "method", "header", "tlsskipverify", "interval", "timeout",
                 "deregistercriticalserviceafter", "status", "serviceid"}


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


def _checks_of(fields: dict[str, Any], instance_id: str, name: str) -> tuple[HealthCheck, ...]:
    """The registration's ``Check`` and ``Checks`` as health checks, with Consul's
    default IDs: ``service:<id>``, numbered ``service:<id>:N`` when there are several."""
    bodies: list[Any] = []
    if fields.get("check"):
        bodies.append(fields["check"])
    extra = fields.get("checks") or []
    if not isinstance(extra, list):
        raise InvalidDefinition(f"Checks must be a list of check objects, got {extra!r}")
    bodies += extra
    checks = []
    for number, body in enumerate(bodies, start=1):
        default_id = f"service:{instance_id}" + (f":{number}" if len(bodies) > 1 else "")
        checks.append(parse_check(body, default_id=default_id,
                                  default_name=f"Service '{name}' check"))
    ids = [c.id for c in checks]
    if len(set(ids)) != len(ids):
        raise InvalidDefinition(f"Checks have duplicate CheckIDs {ids!r}: give each its own")
    return tuple(checks)


def _duration_field(check: dict[str, Any], key: str, label: str) -> float | None:
    value = check.get(key)
    if value in (None, ""):
        return None
    seconds = parse_duration(value) if isinstance(value, str) else None
    if seconds is None or seconds <= 0:
        raise InvalidDefinition(f"check {label} {value!r} must be a duration longer than "
                                "zero, like '10s'")
    return seconds


def _header_of(value: object) -> tuple[tuple[str, str], ...]:
    """Consul's ``"Header": {"Name": ["value", ...]}``, flattened in order."""
    if value in (None, {}):
        return ()
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
            for k, v in value.items()):
        raise InvalidDefinition(f"check Header must map names to lists of strings, like "
                                f"{{\"X-Check\": [\"1\"]}}, got {value!r}")
    return tuple((k, x) for k, v in value.items() for x in v)


def parse_check(body: object, *, default_id: str, default_name: str) -> HealthCheck:
    """One Consul check definition: exactly one of TTL, HTTP, TCP or Args."""
    if not isinstance(body, dict):
        raise InvalidDefinition(f"a check must be an object like {{\"TTL\": \"10s\"}}, "
                                f"got {body!r}")
    check = _normalized(body)
    if "scriptargs" in check and "args" not in check:  # Consul's older name for Args
        check["args"] = check.pop("scriptargs")
    unknown = sorted(k for k in body if k.lower().replace("_", "") not in _CHECK_FIELDS)
    if unknown:
        raise InvalidDefinition(
            f"check has unknown field(s) {', '.join(unknown)}: this agent runs TTL, HTTP, "
            "TCP and Args (script) checks")
    kinds = [key for key in ("ttl", "http", "tcp", "args") if check.get(key)]
    if len(kinds) != 1:
        raise InvalidDefinition(
            "a check needs exactly one of TTL, HTTP, TCP or Args, got "
            f"{', '.join(k.upper() for k in kinds) or 'none'}")
    kind: CheckKind = "script" if kinds[0] == "args" else kinds[0]  # type: ignore[assignment]
    status = check.get("status") or "critical"
    if status not in CHECK_STATUSES:
        raise InvalidDefinition(f"check Status {status!r} is invalid: use passing, warning "
                                "or critical")
    check_id = check.get("checkid") or check.get("id") or default_id
    name = check.get("name") or default_name
    notes = check.get("notes") or ""
    for label, value in (("CheckID", check_id), ("Name", name), ("Notes", notes)):
        if not isinstance(value, str):
            raise InvalidDefinition(f"check {label} must be a string, got {value!r}")
    interval = _duration_field(check, "interval", "Interval")
    if kind != "ttl" and interval is None:
        raise InvalidDefinition(f"check Interval is required for {kind.upper()} checks, "
                                "like \"10s\"")
    target, args = "", ()
    if kind == "http":
        target = check["http"]
        if not isinstance(target, str) or not target.startswith(("http://", "https://")):
            raise InvalidDefinition(f"check HTTP {target!r} must be an http:// or https:// URL")
    elif kind == "tcp":
        target = check["tcp"]
        host, _, port = str(target).rpartition(":")
        if not isinstance(target, str) or not host or not (
                port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise InvalidDefinition(f"check TCP {target!r} must be host:port")
    elif kind == "script":
        args = check["args"]
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise InvalidDefinition(f"check Args must be a list of strings, got {args!r}")
    method = check.get("method") or "GET"
    if not isinstance(method, str) or not method.isalpha():
        raise InvalidDefinition(f"check Method {method!r} is not an HTTP method")
    return HealthCheck(
        id=check_id, kind=kind, name=name, target=target,
        args=tuple(args), method=method.upper(), header=_header_of(check.get("header")),
        tls_skip_verify=bool(check.get("tlsskipverify")),
        interval=max(interval or 0.0, MIN_CHECK_INTERVAL) if kind != "ttl" else 0.0,
        timeout=_duration_field(check, "timeout", "Timeout") or DEFAULT_CHECK_TIMEOUT,
        ttl=_duration_field(check, "ttl", "TTL"),
        deregister_after=_duration_field(check, "deregistercriticalserviceafter",
                                         "DeregisterCriticalServiceAfter"),
        notes=notes, status=status,
    )


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
        meta=dict(meta), node=node, weight=weight, warning_weight=warning_weight,
        checks=_checks_of(fields, instance_id, name),
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
