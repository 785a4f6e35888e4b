"""JSON Patch (RFC 6902) over JSON Pointers (RFC 6901), pure and atomic.

``apply_patch`` applies every operation to a copy and returns it; when one
operation fails, nothing of the patch is applied (RFC 6902 section 5) and the
error names the operation by its position.
"""

from __future__ import annotations

import copy
from typing import Any

_OPS = ("add", "remove", "replace", "move", "copy", "test")
_NEEDS = {"add": ("path", "value"), "remove": ("path",), "replace": ("path", "value"),
          "move": ("from", "path"), "copy": ("from", "path"), "test": ("path", "value")}


class PatchError(ValueError):
    """The patch document is malformed or an operation cannot apply (HTTP 400)."""


class PatchTestFailed(PatchError):
    """A ``test`` operation found another value (RFC 5789 suggests 409 Conflict)."""


def parse_pointer(pointer: str) -> list[str]:
    """RFC 6901: ``""`` is the whole document; ``/a~1b/~0c`` is ``["a/b", "~c"]``."""
    if not isinstance(pointer, str):
        raise PatchError(f"pointer {pointer!r} must be a string")
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"pointer {pointer!r} must be empty or start with '/'")
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def json_equal(a: Any, b: Any) -> bool:
    """RFC 6902 4.6 equality: numbers by value, but true is not 1 (Python's == says so)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _array_index(array: list[Any], token: str, *, for_add: bool) -> int:
    if for_add and token == "-":
        return len(array)
    # RFC 6901 4: decimal digits, no leading zeros
    if not (token.isascii() and token.isdigit()) or (len(token) > 1 and token[0] == "0"):
        raise PatchError(f"{token!r} is not an array index")
    index = int(token)
    if index > len(array) or (index == len(array) and not for_add):
        raise PatchError(f"index {index} is out of range for an array of {len(array)}")
    return index


def _resolve(document: Any, tokens: list[str]) -> Any:
    node = document
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"no member {token!r}")
            node = node[token]
        elif isinstance(node, list):
            node = node[_array_index(node, token, for_add=False)]
        else:
            raise PatchError(f"{token!r} is below a scalar")
    return node


def _add(document: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _resolve(document, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_array_index(parent, last, for_add=True), value)
    else:
        raise PatchError(f"the parent of {last!r} is a scalar")
    return document


def _remove(document: Any, tokens: list[str]) -> tuple[Any, Any]:
    """(document, removed value)."""
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _resolve(document, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"no member {last!r} to remove")
        return document, parent.pop(last)
    if isinstance(parent, list):
        return document, parent.pop(_array_index(parent, last, for_add=False))
    raise PatchError(f"the parent of {last!r} is a scalar")


def _apply_one(document: Any, op: dict[str, Any]) -> Any:
    kind = op["op"]
    path = parse_pointer(op["path"])
    if kind == "add":
        return _add(document, path, copy.deepcopy(op["value"]))
    if kind == "remove":
        return _remove(document, path)[0]
    if kind == "replace":
        _resolve(document, path)  # must exist (RFC 6902 4.3)
        if not path:
            return copy.deepcopy(op["value"])
        parent = _resolve(document, path[:-1])
        key: Any = path[-1] if isinstance(parent, dict) else int(path[-1])
        parent[key] = copy.deepcopy(op["value"])  # in place: members keep their order
        return document
    if kind == "test":
        found = _resolve(document, path)
        if not json_equal(found, op["value"]):
            raise PatchTestFailed(f"test failed: {op['path']!r} is {found!r}, "
                                  f"not {op['value']!r}")
        return document
    source = parse_pointer(op["from"])
    if kind == "move":
        if path[:len(source)] == source and len(path) > len(source):
            raise PatchError(f"cannot move {op['from']!r} into its own child {op['path']!r}")
        document, value = _remove(document, source)
        return _add(document, path, value)
    return _add(document, path, copy.deepcopy(_resolve(document, source)))  # copy


def check_patch(patch: Any) -> list[dict[str, Any]]:
    """The patch as a list of operations with their members checked."""
    if not isinstance(patch, list):
        raise PatchError("a JSON Patch is an array of operations, such as "
                         '[{"op": "add", "path": "/a", "value": 1}]')
    for position, op in enumerate(patch):
        if not isinstance(op, dict) or op.get("op") not in _OPS:
            raise PatchError(f"operation {position}: needs \"op\" as one of {', '.join(_OPS)}")
        missing = [member for member in _NEEDS[op["op"]] if member not in op]
        if missing:
            raise PatchError(f"operation {position} ({op['op']}): missing "
                             f"{', '.join(repr(m) for m in missing)}")
    return patch


def apply_patch(document: Any, patch: Any) -> Any:
    """``document`` with every operation applied in order, or PatchError and nothing."""
    result = copy.deepcopy(document)
    for position, op in enumerate(check_patch(patch)):
        try:
            result = _apply_one(result, op)
        except PatchError as exc:
            raise type(exc)(f"operation {position} ({op['op']} {op['path']!r}): {exc}") from None
    return result
