"""The ``haproxy-cfg`` transformer: a JSON document -> haproxy.cfg text (pure).

    {"global": {"maxconn": 256},
     "defaults": {"mode": "http", "timeout": {"connect": "5s", "client": "30s"}},
     "frontend www": {"bind": "127.0.0.1:8080", "default_backend": "web"},
     "backend web": {"balance": "roundrobin",
                     "server": {"$services": "web", "format": "{id} {address}:{port} check"}}}

Each top-level key is a section header (``global``, ``defaults``, ``frontend
NAME``, ``backend NAME``, ``listen NAME``...). In a section, a scalar is one
keyword line, an array repeats its keyword, and an object continues the keyword
(``timeout connect 5s``); ``null``/``true`` write the keyword alone
(``option httplog``), ``false`` leaves it out.
"""

from __future__ import annotations

from typing import Any

from consulate.control.configurator.transform_errors import TransformError

INDENT = "    "


def _word(value: Any, where: str) -> str:
    text = str(value) if not isinstance(value, bool) else ""
    if isinstance(value, dict | list) or "\n" in text or "\r" in text or "#" in text:
        raise TransformError(f"{where}: {value!r} cannot be part of a keyword line "
                             "(no line breaks or '#')")
    return text


def _lines(words: list[str], value: Any, out: list[str], where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _lines([*words, _word(key, where)], item, out, f"{where}/{key}")
    elif isinstance(value, list):
        for position, item in enumerate(value):
            _lines(words, item, out, f"{where}[{position}]")
    elif value is None or value is True:
        out.append(INDENT + " ".join(words))
    elif value is not False:
        out.append(INDENT + " ".join([*words, _word(value, where)]))


def render(document: Any) -> str:
    if not isinstance(document, dict):
        raise TransformError(f"haproxy-cfg needs an object of sections, not {document!r}")
    sections: list[str] = []
    for header, body in document.items():
        if body is not None and not isinstance(body, dict):
            raise TransformError(f"/{header}: a section is an object of keywords, "
                                 f"not {body!r}")
        out = [_word(header, f"/{header}")]
        _lines([], body or {}, out, f"/{header}")
        sections.append("".join(line + "\n" for line in out))
    return "\n".join(sections)
