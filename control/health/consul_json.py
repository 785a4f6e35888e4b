"""Health data in Consul's JSON shapes (pure): check entries and the
``/v1/health/service`` element (Node, Service, Checks)."""

from __future__ import annotations

from typing import Any

from consulate.control.registry.model import (
    CHECK_STATUSES,
    CheckKind,
    CheckStatus,
    HealthCheck,
    Instance,
)
from consulate.control.service_definition import parse_duration

CHECK_FIELDS = ("Node", "CheckID", "Name", "Status", "Notes", "Output", "ServiceID",
                "ServiceName", "ServiceTags", "Type", "Interval", "Timeout", "Definition",
                "CreateIndex", "ModifyIndex")
HEALTH_FIELDS = ("Node", "Service", "Checks")
_KINDS: dict[str, CheckKind] = {"ttl": "ttl", "http": "http", "tcp": "tcp", "script": "script"}
_STATUSES: dict[str, CheckStatus] = {s: s for s in CHECK_STATUSES}


def go_duration(seconds: float | None) -> str:
    """Seconds as Go prints a time.Duration ("10s", "1m30s", "500ms"); "" for none."""
    if not seconds:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    return text + f"{rest:g}s"


def check_definition(check: HealthCheck) -> dict[str, Any]:
    """What the check runs, with Consul's Definition keys."""
    return {
        "HTTP": check.target if check.kind == "http" else "",
        "TCP": check.target if check.kind == "tcp" else "",
        "ScriptArgs": list(check.args) or None,
        "Method": check.method if check.kind == "http" else "",
        "Header": {name: [v for n, v in check.header if n == name]
                   for name, _ in check.header} or None,
        "TLSSkipVerify": check.tls_skip_verify,
        "Interval": go_duration(check.interval if check.kind != "ttl" else None),
        "Timeout": go_duration(check.timeout if check.kind != "ttl" else None),
        "TTL": go_duration(check.ttl),
        "DeregisterCriticalServiceAfter": go_duration(check.deregister_after),
    }


def check_entry(instance: Instance, check: HealthCheck) -> dict[str, Any]:
    """One element of ``/v1/health/checks/<service>`` and ``/v1/agent/checks``."""
    definition = check_definition(check)
    return {
        "Node": instance.node,
        "CheckID": check.id,
        "Name": check.name,
        "Status": check.status,
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": instance.id,
        "ServiceName": instance.name,
        "ServiceTags": list(instance.tags),
        "Type": check.kind,
        "Interval": definition["Interval"],
        "Timeout": definition["Timeout"],
        "Definition": definition,
        "CreateIndex": instance.create_index,
        "ModifyIndex": instance.modify_index,
    }


def health_entry(instance: Instance, *, node_address: str, datacenter: str,
                 service: dict[str, Any]) -> dict[str, Any]:
    """One element of ``/v1/health/service/<name>``; ``service`` is the instance's
    agent-service block."""
    return {
        "Node": {"ID": "", "Node": instance.node, "Address": node_address,
                 "Datacenter": datacenter,
                 "TaggedAddresses": {"lan": node_address, "wan": node_address},
                 "Meta": {}, "CreateIndex": 0, "ModifyIndex": 0},
        "Service": {**service, "CreateIndex": instance.create_index,
                    "ModifyIndex": instance.modify_index},
        "Checks": [check_entry(instance, check) for check in instance.checks],
    }


def registration_check(check: HealthCheck) -> dict[str, Any]:
    """The check as a service registration carries it (the inverse of parse_check)."""
    body: dict[str, Any] = {"CheckID": check.id, "Name": check.name, "Status": check.status}
    if check.kind == "ttl":
        body["TTL"] = go_duration(check.ttl)
    else:
        body.update({"Interval": go_duration(check.interval),
                     "Timeout": go_duration(check.timeout)})
        if check.kind == "http":
            body.update({"HTTP": check.target, "Method": check.method,
                         "TLSSkipVerify": check.tls_skip_verify})
            if check.header:
                body["Header"] = check_definition(check)["Header"]
        elif check.kind == "tcp":
            body["TCP"] = check.target
        else:
            body["Args"] = list(check.args)
    if check.deregister_after:
        body["DeregisterCriticalServiceAfter"] = go_duration(check.deregister_after)
    if check.notes:
        body["Notes"] = check.notes
    return body


def check_from_entry(entry: dict[str, Any]) -> HealthCheck:
    """A check as ``/v1/health/service`` reports it (what a remote Consul agent runs)."""
    definition = entry.get("Definition") or {}

    def seconds(key: str) -> float | None:
        text = definition.get(key) or ""
        return parse_duration(text) if text else None

    return HealthCheck(
        id=entry["CheckID"], kind=_KINDS.get(entry.get("Type") or "", "ttl"),
        name=entry.get("Name", ""), target=definition.get("HTTP") or definition.get("TCP") or "",
        args=tuple(definition.get("ScriptArgs") or ()), interval=seconds("Interval") or 0.0,
        timeout=seconds("Timeout") or 10.0, ttl=seconds("TTL"),
        deregister_after=seconds("DeregisterCriticalServiceAfter"),
        notes=entry.get("Notes", ""), status=_STATUSES.get(entry.get("Status", ""), "critical"),
        output=entry.get("Output", ""))
