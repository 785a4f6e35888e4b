"""Macros: the parts of a stored document that are computed at render time (pure).

An object with one of these keys is replaced by what it computes::

    {"$value": "settings/port", "default": 80}   another value of the document
    {"$file": "/etc/motd", "default": ""}        a file's text
    {"$env": "WORKERS", "default": "2"}          an environment variable
    {"$services": "web", "tag": "v2", "format": "{address}:{port}", "allow_empty": false}
                                                 the live instances of a registry service
    {"$if": <cond>, "then": a, "else": b}        a or b; without the branch taken, the
                                                 key (or array item) disappears

``$services`` lists instances in one deterministic order (address, port, id:
``instance_order``, which the source of services keeps, sorting once per change
rather than once per template), so that the same registry state always renders
the same bytes. An empty list stops
the render (the last good output stays) unless ``allow_empty`` is true: an
outage or a flapping registry must not empty an upstream block (consul-template
and confd users' most common complaint).
"""

from __future__ import annotations

import functools
import ipaddress
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from consulate.control.configurator import paths

MACROS = ("$value", "$file", "$env", "$services", "$if")
_OPTIONS = {"$value": {"default"}, "$file": {"default"}, "$env": {"default"},
            "$services": {"tag", "format", "allow_empty"}, "$if": {"then", "else"}}

ServiceInstance = Mapping[str, Any]


class MacroError(ValueError):
    """A macro is malformed or names something that does not exist (HTTP 400)."""


class ServicesUnavailable(Exception):
    """The registry cannot give a service's instances now (never read, or it is down)."""


class NoInstances(Exception):
    """A ``$services`` macro found no instance and its template does not allow that."""


class _Omit:
    """What an ``$if`` without the branch taken yields: its key or item is dropped."""


OMIT = _Omit()


@dataclass
class Sources:
    """Where macros read from; the I/O ones are callables so tests can inject them."""

    document: Any
    environ: Mapping[str, str]
    read_file: Callable[[str], str | None]
    # a service's live instances, sorted by instance_order
    services: Callable[[str], Sequence[ServiceInstance]] | None = None
    used_services: set[str] = field(default_factory=set)
    resolving: list[str] = field(default_factory=list)  # $value paths being expanded


@functools.lru_cache(maxsize=1024)
def checked_format(pattern: str) -> str:
    """``pattern`` if its fields are ``{address}``-like or ``{meta[zone]}``-like: no
    attribute access, since a format string comes from a REST client and must not
    reach into Python objects (then str.format_map runs it at C speed)."""
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as exc:
        raise MacroError(f"format {pattern!r}: {exc}") from None
    for _, field_name, spec, _ in parsed:
        if field_name is not None and ("." in field_name or "{" in (spec or "")):
            raise MacroError(f"format field {{{field_name}}}: attributes and nested fields "
                             "are not allowed; use {name} or {meta[key]}")
    return pattern


def instance_order(instance: ServiceInstance) -> tuple[Any, ...]:
    """Sort key: IP addresses numerically (10.0.0.9 before 10.0.0.10), then port, id."""
    address = str(instance.get("address", ""))
    try:
        numeric: tuple[int, int] = (0, int(ipaddress.ip_address(address)))
    except ValueError:
        numeric = (1, 0)
    return (*numeric, address, int(instance.get("port", 0)), str(instance.get("id", "")))


def expand(node: Any, sources: Sources) -> Any:
    """``node`` with every macro replaced, recursively (macros may nest)."""
    if isinstance(node, dict):
        macro = [key for key in MACROS if key in node]
        if macro:
            return _macro(macro, node, sources)
        expanded = {key: expand(value, sources) for key, value in node.items()}
        return {key: value for key, value in expanded.items() if value is not OMIT}
    if isinstance(node, list):
        items = [expand(item, sources) for item in node]
        return [item for item in items if item is not OMIT]
    return node


def _macro(found: list[str], node: dict[str, Any], sources: Sources) -> Any:
    if len(found) > 1:
        raise MacroError(f"one object holds {' and '.join(found)}: one macro per object")
    name = found[0]
    unknown = set(node) - {name} - _OPTIONS[name]
    if unknown:
        raise MacroError(f"{name}: unknown option(s) {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(sorted(_OPTIONS[name])) or 'none'}")
    argument = expand(node[name], sources)
    if name == "$if":
        branch = "then" if argument else "else"
        return expand(node[branch], sources) if branch in node else OMIT
    if name == "$services":
        return _services(argument, node, sources)
    if not isinstance(argument, str):
        raise MacroError(f"{name} needs a string, not {argument!r}")
    if name == "$value":
        if argument in sources.resolving:
            cycle = " -> ".join([*sources.resolving, argument])
            raise MacroError(f"$value {argument!r}: a cycle ({cycle})")
        try:
            referenced = paths.get(sources.document, argument)
        except paths.PathError:
            found_value: Any = None
        else:
            sources.resolving.append(argument)
            try:
                return expand(referenced, sources)
            finally:
                sources.resolving.pop()
    elif name == "$file":
        found_value = sources.read_file(argument)
    else:
        found_value = sources.environ.get(argument)
    if found_value is not None:
        return found_value
    if "default" in node:
        return expand(node["default"], sources)
    what = {"$value": "no value at that path", "$file": "no readable file there",
            "$env": "no such environment variable"}[name]
    raise MacroError(f'{{"{name}": "{argument}"}}: {what}; add a "default"')


def _services(service: Any, node: dict[str, Any], sources: Sources) -> Any:
    if not isinstance(service, str) or not service:
        raise MacroError(f"$services needs a service name, not {service!r}")
    if sources.services is None:
        raise ServicesUnavailable(f"$services {service!r}: this configurator has no registry")
    sources.used_services.add(service)
    found = [i for i in sources.services(service)
             if "tag" not in node or node["tag"] in i.get("tags", ())]
    if not found and not node.get("allow_empty", False):
        raise NoInstances(f"$services {service!r}: no live instance"
                          + (f" tagged {node['tag']!r}" if "tag" in node else "")
                          + '; the last good output stays (set "allow_empty": true to '
                          "render an empty list)")
    if "format" not in node:
        return [dict(i) for i in found]
    pattern = node["format"]
    if not isinstance(pattern, str):
        raise MacroError(f"$services {service!r}: format must be a string such as "
                         "'{address}:{port}'")
    checked_format(pattern)
    try:
        return [pattern.format_map(i) for i in found]
    except (KeyError, IndexError, ValueError, TypeError) as exc:  # TypeError: {tags:d}
        raise MacroError(f"$services {service!r}: format {pattern!r}: {exc!r} (fields: "
                         f"{', '.join(sorted(found[0]))})") from None
