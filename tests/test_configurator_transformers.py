"""Transformers: golden files (tests/golden/configurator/), byte-identical output for
identical input, the real programs accept the golden outputs, and bad input is
refused with its path."""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from consulate.control.configurator import haproxy_cfg, nginx_conf, toml_out
from consulate.control.configurator.transform_errors import TransformError
from consulate.control.configurator.transformers import UnknownTransformer, make_transformer

GOLDEN = Path(__file__).parent / "golden" / "configurator"
CASES = [("nginx-conf", "nginx.json", "nginx.conf"), ("haproxy-cfg", "haproxy.json", "haproxy.cfg"),
         ("toml", "toml.json", "app.toml"), (f"jinja2:{GOLDEN}/jinja2.j2", "jinja2.json",
                                             "jinja2.txt")]


def _load(name: str) -> Any:
    return json.loads((GOLDEN / name).read_text())


@pytest.mark.parametrize(("spec", "source", "golden"), CASES)
def test_golden_output(spec: str, source: str, golden: str) -> None:
    rendered = make_transformer(spec).render(_load(source))
    assert rendered.encode() == (GOLDEN / golden).read_bytes()


@pytest.mark.parametrize(("spec", "source", "golden"), CASES)
def test_identical_input_gives_identical_bytes(spec: str, source: str, golden: str) -> None:
    first = make_transformer(spec).render(_load(source))
    again = make_transformer(spec).render(json.loads(json.dumps(_load(source))))
    assert first.encode() == again.encode()


def test_nginx_accepts_the_golden_config(tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"
    shutil.copy(GOLDEN / "nginx.conf", conf)
    done = subprocess.run(["nginx", "-t", "-q", "-p", str(tmp_path), "-c", str(conf)],
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, "")


def test_haproxy_accepts_the_golden_config(tmp_path: Path) -> None:
    done = subprocess.run(["haproxy", "-c", "-q", "-f", str(GOLDEN / "haproxy.cfg")],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_toml_round_trips_through_tomllib() -> None:
    assert tomllib.loads((GOLDEN / "app.toml").read_text()) == _load("toml.json")


@pytest.mark.parametrize(("render", "document", "message"), [
    (nginx_conf.render, {"http": {"root": "/x; include /etc/passwd"}},
     "/http/root: '/x; include /etc/passwd' holds an unquoted ';'"),
    (nginx_conf.render, {"a": "x\ny"}, "/a: 'x\\ny' holds a line break"),
    (nginx_conf.render, {"return": "200 'open"}, "/return: \"200 'open\" has an unclosed '"),
    (nginx_conf.render, [1], "nginx-conf needs an object of directives, not [1]"),
    (nginx_conf.render, {"x": [{"y": [[{"z": 1}]]}]},
     "/x[0]/y[0]: {'z': 1} cannot be a directive's argument"),
    (haproxy_cfg.render, {"global": 1}, "/global: a section is an object of keywords, not 1"),
    (haproxy_cfg.render, {"backend b": {"server": "a 1:1\nlisten x"}},
     "/backend b/server: 'a 1:1\\nlisten x' cannot be part of a keyword line"),
    (toml_out.render, {"a": {"b": None}}, "/a/b: TOML has no null"),
    (toml_out.render, "x", "toml needs an object at the top, not 'x'"),
])
def test_bad_documents_are_refused_with_their_path(render: Any, document: Any,
                                                   message: str) -> None:
    with pytest.raises(TransformError) as caught:
        render(document)
    assert str(caught.value).startswith(message)


def test_quoted_semicolons_and_braces_pass() -> None:
    assert nginx_conf.render({"return": "200 '{ok;}'"}) == "return 200 '{ok;}';\n"


def test_unknown_transformer_and_missing_template(tmp_path: Path) -> None:
    with pytest.raises(UnknownTransformer, match="transformer 'xml' is unknown: use one of "
                       "nginx-conf, haproxy-cfg, toml, jinja2:PATH"):
        make_transformer("xml")
    with pytest.raises(UnknownTransformer, match="is not there"):
        make_transformer(f"jinja2:{tmp_path}/missing.j2")
    (tmp_path / "bad.j2").write_text("{% for %}")
    with pytest.raises(UnknownTransformer, match=r"bad.j2' line 1: "):
        make_transformer(f"jinja2:{tmp_path}/bad.j2")


def test_jinja_undefined_variable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "t.j2").write_text("{{ missing }}")
    with pytest.raises(TransformError, match=r"jinja2 template t\.j2: 'missing' is undefined"):
        make_transformer(f"jinja2:{tmp_path}/t.j2").render({})


def test_a_toml_key_ending_in_a_line_break_is_quoted() -> None:
    """Found by make fuzz: the bare-key pattern's $ also matched before a final
    newline, so {"0\\n": []} rendered as a broken line."""
    text = toml_out.render({"0\n": [], "a": {"b\n": 1}})
    assert text == '"0\\n" = []\n\n[a]\n"b\\n" = 1\n'
    assert tomllib.loads(text) == {"0\n": [], "a": {"b\n": 1}}
