"""Consul's ?filter= expressions (control/filter_expr.py), evaluated without I/O."""

from __future__ import annotations

from typing import Any

import pytest

from consulate.control.filter_expr import FilterError, compile_filter
from consulate.control.health.consul_json import go_duration

FIELDS = ("Service", "Checks", "Node")
DOC: dict[str, Any] = {
    "Node": {"Node": "h1", "Meta": {}},
    "Service": {"ID": "web-1", "Tags": ["v1", "blue"], "Meta": {"version": "1.2"}, "Port": 80,
                "EnableTagOverride": False, "Address": ""},
    "Checks": [{"CheckID": "a", "Status": "passing"}, {"CheckID": "b", "Status": "warning"}],
}


@pytest.mark.parametrize(("expression", "expected"), [
    ('Service.ID == "web-1"', True),
    ("Service.ID == web-1", True),  # a bare word is a value
    ("Service.ID == `web-1`", True),
    ('Service.ID != "web-1"', False),
    ("Service.Port == 80", True),
    ("Service.EnableTagOverride == false", True),
    ("Service.Tags contains blue", True),
    ("Service.Tags not contains blue", False),
    ('"v1" in Service.Tags', True),
    ('"v3" not in Service.Tags', True),
    ('"ver" in Service.Meta', False),  # a map: membership of a key
    ('"version" in Service.Meta', True),
    ('"web" in Service.ID', True),  # a string: a substring
    ("Service.Meta.version matches `^1\\.[0-9]$`", True),
    ("Service.Meta.version not matches `^2`", True),
    ("Service.Address is empty", True),
    ("Node.Meta is empty", True),
    ("Service.Meta.missing is empty", True),
    ("Service.Tags is not empty", True),
    ("Checks.Status == warning", True),  # any element of a list
    ("Checks.Status == critical", False),
    ("Checks.Status != critical", True),
    ("not Checks.Status == critical and Service.Tags contains v1", True),
    ("Service.Tags contains v9 or Service.Tags contains blue and Service.Port == 81", False),
    ("(Service.Tags contains v9 or Service.Tags contains blue) and Service.Port == 80", True),
    ("not not Service.Port == 80", True),
    ('Service.ID == "with \\"quote\\""', False),
])
def test_expressions(expression: str, expected: bool) -> None:
    assert compile_filter(expression, FIELDS)(DOC) is expected


@pytest.mark.parametrize(("expression", "reason"), [
    ("", "the expression is empty"),
    ("Colour == red", "Selector 'Colour' is not valid: selectors start with one of Checks, "
                      "Node, Service"),
    ("Service.Port", "the expression ends where an operator (==, !=, is, contains, matches, "
                     "in) was expected"),
    ("Service.Port > 1", "unknown operator '>': use ==, !=, is empty, is not empty, in, "
                         "not in, contains, not contains, matches"),
    ("Service.Port is full", "expected 'empty' after 'is'"),
    ("Service.Port like 1", "unknown operator 'like': use ==, !=, is empty, is not empty, in, "
                            "not in, contains, not contains, matches"),
    ("(Service.Port == 1", "the expression ends where ')' was expected"),
    ("Service.Port == 1 Service.Port == 2", "unexpected 'Service.Port' after a complete "
                                            "expression"),
    ("Service.ID matches `(`", "bad regular expression '(': missing ), unterminated "
                               "subpattern at position 0"),
    ("and == 1", "expected a selector such as Service.Tags, got 'and'"),
    ('Service.ID == "open', "unexpected character '\"' at offset 14"),
])
def test_bad_expressions_say_why(expression: str, reason: str) -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter(expression, FIELDS)
    assert str(caught.value) == f"Failed to create boolean expression evaluator: {reason}"


@pytest.mark.parametrize(("seconds", "text"), [
    (None, ""), (0.0, ""), (0.5, "500ms"), (10.0, "10s"), (90.0, "1m30s"), (60.0, "1m0s"),
    (3725.0, "1h2m5s"), (1.5, "1.5s"),
])
def test_go_durations(seconds: float | None, text: str) -> None:
    assert go_duration(seconds) == text
