"""Transformers by name, as the command line and the agent option give them.

``nginx-conf``, ``haproxy-cfg`` and ``toml`` turn the document into that format;
``jinja2:PATH`` renders the template at PATH with the document's top-level keys
as variables (and the whole document as ``config``). Each transformer brings
the check command its program validates a file with, in confd's ``{{.src}}``
notation for the staged file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from consulate.control.configurator import haproxy_cfg, nginx_conf, toml_out
from consulate.control.configurator.transform_errors import TransformError

NAMES = ("nginx-conf", "haproxy-cfg", "toml", "jinja2:PATH")


class UnknownTransformer(ValueError):
    """The transformer name is not one of NAMES, or its template cannot be loaded."""


@dataclass(frozen=True)
class Transformer:
    name: str
    render: Callable[[Any], str]
    check: str  # default check command ("" when the format has no checker)


def _jinja(path: Path) -> Callable[[Any], str]:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent)), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False)
    try:
        template = environment.get_template(path.name)
    except jinja2.TemplateNotFound:
        raise UnknownTransformer(f"jinja2 template {str(path)!r} is not there: give the "
                                 "path of a readable template file") from None
    except jinja2.TemplateSyntaxError as exc:
        raise UnknownTransformer(f"jinja2 template {str(path)!r} line {exc.lineno}: "
                                 f"{exc.message}") from None

    def render(document: Any) -> str:
        variables = dict(document) if isinstance(document, dict) else {}
        variables["config"] = document
        try:
            return template.render(variables)
        except jinja2.TemplateError as exc:
            raise TransformError(f"jinja2 template {path.name}: {exc}") from None

    return render


def make_transformer(spec: str) -> Transformer:
    if spec == "nginx-conf":
        return Transformer(spec, nginx_conf.render, "nginx -t -q -c {{.src}}")
    if spec == "haproxy-cfg":
        return Transformer(spec, haproxy_cfg.render, "haproxy -c -q -f {{.src}}")
    if spec == "toml":
        return Transformer(spec, toml_out.render, "")
    if spec.startswith("jinja2:") and len(spec) > len("jinja2:"):
        return Transformer(spec, _jinja(Path(spec.removeprefix("jinja2:"))), "")
    raise UnknownTransformer(f"transformer {spec!r} is unknown: use one of {', '.join(NAMES)}")
