"""A service as a Consul registration: SERVICE_CHECK_* as a check, the rest as Meta (pure).

The check rules are registrator's Consul backend's (backends.md): one check per
service, the first of HTTP, HTTPS, CMD, SCRIPT, TTL, TCP that is set;
``_INTERVAL`` (10s by default for the checks the agent runs), ``_TIMEOUT`` for
HTTP(S) and TCP, ``_DEREGISTER_AFTER`` and ``_INITIAL_STATUS`` for any. Script
commands get ``$SERVICE_IP`` and ``$SERVICE_PORT`` replaced; ``CHECK_CMD`` runs
registrator's ``check-cmd <container> <port> <cmd>`` helper, as registrator does.
Consul dropped ``Script`` for ``Args``, so commands are sent as ``sh -c`` args.
"""

from __future__ import annotations

from typing import Any

from consulate.control.registrator.model import Service, short_id
from consulate.control.service_definition import InvalidDefinition, check_meta

DEFAULT_INTERVAL = "10s"
_CHECK_PREFIX = "check_"


def consul_check(service: Service) -> dict[str, Any] | None:
    """The check registrator's SERVICE_CHECK_* attributes ask for, or None."""
    attrs = service.attrs
    address = f"{service.ip}:{service.port}"
    check: dict[str, Any] = {}
    if attrs.get("check_initial_status"):
        check["Status"] = attrs["check_initial_status"]
    if attrs.get("check_http"):
        check["HTTP"] = f"http://{address}{attrs['check_http']}"
    elif attrs.get("check_https"):
        check["HTTP"] = f"https://{address}{attrs['check_https']}"
    elif attrs.get("check_cmd"):
        origin = service.origin
        check["Args"] = ["sh", "-c", f"check-cmd {short_id(origin.container_id)} "
                                     f"{origin.exposed_port} {attrs['check_cmd']}"]
    elif attrs.get("check_script"):
        script = attrs["check_script"].replace("$SERVICE_IP", service.ip)
        check["Args"] = ["sh", "-c", script.replace("$SERVICE_PORT", str(service.port))]
    elif attrs.get("check_ttl"):
        check["TTL"] = attrs["check_ttl"]
    elif attrs.get("check_tcp"):
        check["TCP"] = address
    else:
        return None
    if ("HTTP" in check or "TCP" in check) and attrs.get("check_timeout"):
        check["Timeout"] = attrs["check_timeout"]
    if "TTL" not in check:
        check["Interval"] = attrs.get("check_interval") or DEFAULT_INTERVAL
    if attrs.get("check_deregister_after"):
        check["DeregisterCriticalServiceAfter"] = attrs["check_deregister_after"]
    return check


def consul_meta(service: Service) -> tuple[dict[str, str], list[str]]:
    """Attributes that are not check settings, as Consul Meta; and the keys Consul
    would refuse (kept out so that one odd label does not lose the registration)."""
    meta: dict[str, str] = {}
    refused = []
    for key, value in sorted(service.attrs.items()):
        if key.startswith(_CHECK_PREFIX):
            continue
        try:
            check_meta({**meta, key: value})
        except InvalidDefinition:
            refused.append(key)
        else:
            meta[key] = value
    return meta, refused


def consul_registration(service: Service) -> dict[str, Any]:
    """The body of ``PUT /v1/agent/service/register`` for ``service``."""
    body: dict[str, Any] = {"ID": service.id, "Name": service.name, "Port": service.port,
                            "Address": service.ip, "Tags": list(service.tags),
                            "Meta": consul_meta(service)[0]}
    check = consul_check(service)
    if check is not None:
        body["Check"] = check
    return body
