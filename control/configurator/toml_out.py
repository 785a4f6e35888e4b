"""The ``toml`` transformer: a JSON document -> TOML 1.0 text (pure).

Tables come after the plain keys of their parent (TOML needs that order), arrays
of objects become arrays of tables, other nesting inline tables. TOML has no
null: a null is refused with its path.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from consulate.control.configurator.transform_errors import TransformError

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _key(key: str) -> str:
    return key if _BARE.fullmatch(key) else _string(key)  # $ alone lets a final \n by


def _value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return json.dumps(value)  # shortest repr, with a '.' or an exponent
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v, f"{where}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v, f'{where}/{k}')}"
                               for k, v in value.items()) + "}"
    raise TransformError(f"{where or '/'}: TOML has no null; remove the key or give a value")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _table(body: dict[str, Any], header: list[str], out: list[str], where: str) -> None:
    for key, value in body.items():
        if not isinstance(value, dict) and not _is_table_array(value):
            out.append(f"{_key(key)} = {_value(value, f'{where}/{key}')}")
    for key, value in body.items():
        path = [*header, _key(key)]
        if isinstance(value, dict):
            out.extend(["", f"[{'.'.join(path)}]"] if out else [f"[{'.'.join(path)}]"])
            _table(value, path, out, f"{where}/{key}")
        elif _is_table_array(value):
            for position, item in enumerate(value):
                out.extend(["", f"[[{'.'.join(path)}]]"] if out else [f"[[{'.'.join(path)}]]"])
                _table(item, path, out, f"{where}/{key}[{position}]")


def render(document: Any) -> str:
    if not isinstance(document, dict):
        raise TransformError(f"toml needs an object at the top, not {document!r}")
    out: list[str] = []
    _table(document, [], out, "")
    return "".join(line + "\n" for line in out)
