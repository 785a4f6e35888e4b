"""Macros and quiescence: pure logic, no I/O (files and services injected)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from consulate.control.configurator import macros
from consulate.control.configurator.engine import InvalidConfig, Template, render_all
from consulate.control.configurator.quiescence import BadWait, Quiescence, Wait, parse_wait
from consulate.control.configurator.target import TargetFile
from consulate.control.configurator.transformers import make_transformer

WEB = [
    {"id": "w10", "name": "web", "address": "10.0.0.10", "port": 80, "tags": ["v2"]},
    {"id": "w9", "name": "web", "address": "10.0.0.9", "port": 80, "tags": ["v1"]},
    {"id": "w9b", "name": "web", "address": "10.0.0.9", "port": 79, "tags": []},
]


def _services(name: str) -> Sequence[macros.ServiceInstance]:
    if name == "down":
        raise macros.ServicesUnavailable("registry down")
    return {"web": WEB}.get(name, [])


def _sources(document: Any) -> macros.Sources:
    return macros.Sources(document, {"WORKERS": "4"},
                          {"/etc/motd": "hello\n"}.get, _services)


def _expand(document: Any) -> Any:
    return macros.expand(document, _sources(document))


def test_value_file_env_and_defaults() -> None:
    doc = {"settings": {"port": 8080},
           "listen": {"$value": "settings/port"},
           "other": {"$value": "settings/missing", "default": {"$env": "WORKERS"}},
           "motd": {"$file": "/etc/motd"}, "none": {"$file": "/nope", "default": ""},
           "workers": {"$env": "WORKERS"}, "user": {"$env": "NOPE", "default": "www"}}
    assert _expand(doc) == {"settings": {"port": 8080}, "listen": 8080, "other": "4",
                            "motd": "hello\n", "none": "", "workers": "4", "user": "www"}


def test_instance_order_is_address_then_port_then_id() -> None:
    assert [i["id"] for i in sorted(WEB, key=macros.instance_order)] == ["w9b", "w9", "w10"]
    found = _expand({"$services": "web"})
    assert found == WEB  # the source's order (the follower keeps instance_order)
    assert _expand({"s": {"$services": "web", "format": "{id} {address}:{port}",
                          "tag": "v2"}}) == {"s": ["w10 10.0.0.10:80"]}


def test_services_empty_stops_the_render_unless_allowed() -> None:
    with pytest.raises(macros.NoInstances) as caught:
        _expand({"$services": "api"})
    assert str(caught.value) == ("$services 'api': no live instance; the last good output "
                                 'stays (set "allow_empty": true to render an empty list)')
    assert _expand({"x": {"$services": "api", "allow_empty": True}}) == {"x": []}
    with pytest.raises(macros.ServicesUnavailable):
        _expand({"$services": "down", "allow_empty": True})


def test_if_drops_the_key_without_a_branch() -> None:
    doc = {"debug": False, "log": {"$if": {"$value": "debug"}, "then": "debug"},
           "level": {"$if": {"$value": "debug"}, "then": "debug", "else": "info"},
           "items": [1, {"$if": False, "then": 2}, 3]}
    assert _expand(doc) == {"debug": False, "level": "info", "items": [1, 3]}


@pytest.mark.parametrize(("document", "message"), [
    ({"$value": "a", "$env": "B"}, "one object holds $value and $env: one macro per object"),
    ({"$value": "a", "dfault": 1}, "$value: unknown option(s) dfault; it takes default"),
    ({"$value": "nope"}, '{"$value": "nope"}: no value at that path; add a "default"'),
    ({"$env": 5}, "$env needs a string, not 5"),
    ({"a": {"$value": "b"}, "b": {"$value": "a"}}, "$value 'b': a cycle (b -> a -> b)"),
    ({"$services": "web", "format": "{address.__class__}"},
     "format field {address.__class__}: attributes and nested fields are not allowed"),
    ({"$services": "web", "format": "{port:{address.real}}"},
     "format field {port}: attributes and nested fields are not allowed"),
    ({"$services": "web", "format": "{port"}, "format '{port': expected '}' before end"),
    ({"$services": "web", "format": "{nope}"}, "$services 'web': format '{nope}': KeyError"),
])
def test_macro_errors(document: Any, message: str) -> None:
    with pytest.raises(macros.MacroError) as caught:
        _expand(document)
    assert str(caught.value).startswith(message)


def test_used_services_are_recorded() -> None:
    sources = _sources({"a": {"$services": "web"}, "b": {"$services": "api",
                                                         "allow_empty": True}})
    macros.expand(sources.document, sources)
    assert sources.used_services == {"web", "api"}


def test_parse_wait() -> None:
    assert parse_wait("2s") == Wait(2.0, 8.0)
    assert parse_wait("500ms:5s") == Wait(0.5, 5.0)
    assert parse_wait("0") == Wait(0.0, 0.0)
    assert parse_wait("1.5") == Wait(1.5, 6.0)
    for bad in ("x", "5s:1s", "1s:"):
        with pytest.raises(BadWait):
            parse_wait(bad)


def test_quiescence_waits_for_min_and_caps_at_max() -> None:
    q = Quiescence(Wait(1.0, 4.0))
    assert q.deadline() is None and not q.due(100.0)
    q.change(0.0)
    assert q.deadline() == 1.0
    for now in (0.5, 1.2, 2.0, 2.9, 3.5):  # each change pushes min, max still holds
        assert not q.due(now)
        q.change(now)
    assert q.deadline() == 4.0 and q.due(4.0)
    q.fired()
    assert not q.pending and q.deadline() is None
    q.change(10.0)
    assert q.deadline() == 11.0


def test_quiescence_storm_renders_once_per_window() -> None:
    """100 changes/s for 5 s with --wait 1s (max 4s): renders at 4 s and 6 s only."""
    q = Quiescence(Wait(1.0, 4.0))
    renders = []
    for tick in range(0, 700):
        now = tick / 100
        if tick < 500:
            q.change(now)
        if q.due(now):
            renders.append(now)
            q.fired()
    assert renders == [4.0, 5.99]


# -- found by make fuzz -----------------------------------------------------------------


def test_a_format_spec_that_does_not_fit_the_field_is_a_macro_error() -> None:
    with pytest.raises(macros.MacroError) as caught:
        _expand({"$services": "web", "format": "{tags:d}"})
    assert str(caught.value) == ("$services 'web': format '{tags:d}': TypeError('unsupported "
                                 "format string passed to list.__format__') (fields: address, "
                                 "id, name, port, tags)")


def _render_toml(document: Any, where: Path) -> str:
    template = Template(make_transformer("toml"), TargetFile(where / "out.toml"), "")
    [rendered] = render_all(document, [template], _sources(document))
    return rendered.text


def _lists(depth: int) -> Any:
    nested: Any = []
    for _ in range(depth - 1):
        nested = [nested]
    return nested


def test_documents_nested_too_deeply_are_refused(tmp_path: Path) -> None:
    """Macros and transformers recurse: past 64 levels a document is refused with a
    message instead of running them out of stack (a 500 before)."""
    assert _render_toml({"a": _lists(63)}, tmp_path) == "a = " + "[" * 63 + "]" * 63 + "\n"
    with pytest.raises(InvalidConfig) as caught:
        _render_toml({"a": _lists(64)}, tmp_path)
    assert str(caught.value) == ("the document nests arrays and objects more than 64 levels "
                                 "deep: flatten it")
    chain: dict[str, Any] = {f"k{i}": {"$value": f"k{i + 1}"} for i in range(1500)}
    chain["k1500"] = 1
    with pytest.raises(InvalidConfig) as caught:
        _render_toml(chain, tmp_path)
    assert str(caught.value) == ("the document's macros expand to arrays and objects nested "
                                 "too deeply (a long chain of $value?): flatten it")
