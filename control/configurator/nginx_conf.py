"""The ``nginx-conf`` transformer: a JSON document -> nginx.conf text (pure).

    {"worker_processes": 1, "events": {},
     "http": {"upstream app": {"server": ["10.0.0.1:80", "10.0.0.2:80"]},
              "server": {"listen": 80, "location /": {"proxy_pass": "http://app"}}}}

An object is a block (its key carries the block's arguments: ``upstream app``,
``location /``); a scalar is one directive (``true``/``false`` become on/off,
``null`` a directive without arguments such as ``ip_hash;``); an array repeats
its key once per item, and an array inside it is one directive's arguments.
Keys keep the document's order, since nginx reads some directives in order.
A value that would end a directive or open a block (an unquoted ``;``, ``{``,
``}``, or a newline) is refused: a REST client must not inject directives.
"""

from __future__ import annotations

import re
from typing import Any

from consulate.control.configurator.transform_errors import TransformError

INDENT = "    "


_SPECIAL = re.compile(r"[;{}\"'\\\r\n]")


def check_token(text: str, where: str) -> str:
    """``text`` if it cannot end a directive or open a block outside quotes."""
    if not _SPECIAL.search(text):
        return text  # the common case, without a character-by-character scan
    quote = ""
    escaped = False
    for char in text:
        if char in "\r\n":
            raise TransformError(f"{where}: {text!r} holds a line break")
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in ";{}":
            raise TransformError(f"{where}: {text!r} holds an unquoted {char!r}; quote it "
                                 "if it is part of a value")
    if quote:
        raise TransformError(f"{where}: {text!r} has an unclosed {quote}")
    return text


def _argument(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return check_token(value, where)
    raise TransformError(f"{where}: {value!r} cannot be a directive's argument")


def _directive(name: str, value: Any, depth: int, out: list[str], where: str) -> None:
    indent = INDENT * depth
    if isinstance(value, dict):
        out.append(f"{indent}{name} {{")
        _block(value, depth + 1, out, where)
        out.append(f"{indent}}}")
    elif isinstance(value, list):
        for position, item in enumerate(value):
            item_where = f"{where}[{position}]"
            if isinstance(item, list):
                words = [name, *(_argument(a, item_where) for a in item)]
                out.append(f"{indent}{' '.join(words)};")
            else:
                _directive(name, item, depth, out, item_where)
    elif value is None:
        out.append(f"{indent}{name};")
    else:
        out.append(f"{indent}{name} {_argument(value, where)};")


def _block(body: dict[str, Any], depth: int, out: list[str], where: str) -> None:
    for name, value in body.items():
        if not name.strip():
            raise TransformError(f"{where}: an empty directive name")
        _directive(check_token(name, f"{where}/{name}"), value, depth, out, f"{where}/{name}")


def render(document: Any) -> str:
    if not isinstance(document, dict):
        raise TransformError(f"nginx-conf needs an object of directives, not {document!r}")
    out: list[str] = []
    _block(document, 0, out, "")
    return "".join(line + "\n" for line in out)
