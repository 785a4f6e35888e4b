"""Edits of a JSON document addressed by ``/v1/config/<path>`` (pure, no I/O).

A path is slash-separated: object keys, or decimal indexes into arrays
(``upstreams/web/servers/0``); the empty path is the whole document. A path may
also come as its list of segments, so that a key holding ``/`` (nginx's
``location /``, sent as ``location%20%2F``) can be addressed. Every edit
returns a new document and leaves its argument untouched, so that a rejected
change (it failed validation, the store moved on) costs nothing to forget.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

JsonPath = str | Sequence[str]


class PathError(Exception):
    """The path or the value does not fit the document; the message says how."""


class PathNotFound(PathError):
    """Nothing is stored at the path (HTTP 404)."""


class NotAContainer(PathError):
    """POST needs an object to merge into or an array to append to (HTTP 405)."""


def split_path(path: JsonPath) -> list[str]:
    """``a/b/0`` -> ``["a", "b", "0"]``; empty segments (``a//b``, a trailing ``/``)
    are dropped, as a URL path reads."""
    parts = path.split("/") if isinstance(path, str) else path
    return [part for part in parts if part]


def show(path: JsonPath) -> str:
    return "/" + "/".join(split_path(path))


def _child(node: Any, part: str, path: JsonPath) -> Any:
    if isinstance(node, dict):
        if part not in node:
            raise PathNotFound(f"no key {part!r} at {show(path)!r}")
        return node[part]
    if isinstance(node, list):
        return node[_index(node, part, path)]
    raise PathNotFound(f"{show(path)!r}: {part!r} is below a {_kind(node)}, which has no "
                       "children")


def _index(node: list[Any], part: str, path: JsonPath, *,
           allow_end: bool = False) -> int:
    limit = len(node) + (1 if allow_end else 0)
    if not (part.isascii() and part.isdigit()) or int(part) >= limit:
        raise PathNotFound(f"{show(path)!r}: {part!r} is not an index of this array of "
                           f"{len(node)} (use 0 to {limit - 1})")
    return int(part)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else "null"


def get(document: Any, path: JsonPath) -> Any:
    """The value at ``path``; PathNotFound when there is none."""
    node = document
    for part in split_path(path):
        node = _child(node, part, path)
    return node


def put(document: Any, path: JsonPath, value: Any) -> Any:
    """Replace the value at ``path``, or create it (and missing parent objects)."""
    parts = split_path(path)
    if not parts:
        return copy.deepcopy(value)
    result = copy.deepcopy(document)
    parent = result
    for depth, part in enumerate(parts[:-1]):
        if isinstance(parent, dict) and part not in parent:
            parent[part] = {}
        elif not isinstance(parent, dict | list):
            raise PathNotFound(f"{show(path)!r}: {show(parts[:depth])!r} is a "
                               f"{_kind(parent)}, which has no children")
        parent = _child(parent, part, path)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = copy.deepcopy(value)
    elif isinstance(parent, list):
        index = _index(parent, last, path, allow_end=True)
        if index == len(parent):
            parent.append(copy.deepcopy(value))
        else:
            parent[index] = copy.deepcopy(value)
    else:
        raise PathNotFound(f"{show(path)!r}: the parent is a {_kind(parent)}, which has no "
                           "children")
    return result


def post(document: Any, path: JsonPath, value: Any) -> Any:
    """Merge ``value`` (an object) into the object at ``path``, or append it to the
    array there; anything else there raises NotAContainer."""
    target = get(document, path)
    if isinstance(target, list):
        return put(document, path, [*target, value])
    if isinstance(target, dict):
        if not isinstance(value, dict):
            raise PathError(f"POST {show(path)!r}: merging into an object needs an object, "
                            f"not a {_kind(value)}; use PUT to replace it")
        return put(document, path, {**target, **value})
    raise NotAContainer(f"POST {show(path)!r}: the value there is a {_kind(target)}; POST "
                        "merges into objects and appends to arrays: use PUT to replace it")


def delete(document: Any, path: JsonPath) -> Any:
    """Remove the value at ``path`` (the document itself cannot be removed)."""
    parts = split_path(path)
    if not parts:
        raise PathError("DELETE of the whole document: PUT {} to empty it instead")
    _child(get(document, parts[:-1]), parts[-1], path)  # PathNotFound when absent
    result = copy.deepcopy(document)
    parent = get(result, parts[:-1])
    if isinstance(parent, dict):
        del parent[parts[-1]]
    else:
        del parent[int(parts[-1])]
    return result
