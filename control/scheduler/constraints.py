"""Constraints: Nomad's operators on node attributes, checked statically and per node.

``{"attribute": "${attr.kernel.name}", "operator": "=", "value": "linux"}``.
Attribute operators compare one node attribute with the value: ``= != < <= > >=``
(numbers when both sides are numbers, else strings, as Nomad), ``regexp``,
``set_contains`` (all of the comma-separated values), ``set_contains_any``,
``version`` (``">= 5.4, < 7"``, ``~>`` pessimistic) and ``is_set``/``is_not_set``.
``distinct_hosts`` and ``distinct_property`` depend on the allocations already
placed, so placement checks them; this module only validates them.

A leading ``~`` makes an attribute constraint soft, as Docker Swarm's ``==~``
does: a node that misses it stays feasible but scores lower, by ``weight``
(1-100, default 50).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from consulate.control.scheduler.nodes import Node

ATTRIBUTE_OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "regexp", "set_contains",
                       "set_contains_any", "version", "is_set", "is_not_set")
PLACEMENT_OPERATORS = ("distinct_hosts", "distinct_property")
OPERATORS = ATTRIBUTE_OPERATORS + PLACEMENT_OPERATORS
_ALIASES = {"==": "=", "is": "=", "not": "!=", "semver": "version"}
_TARGET = re.compile(r"^\$\{(attr\.[^}]+|meta\.[^}]+|node\.unique\.name|node\.unique\.id|"
                     r"node\.datacenter)\}$")

Resolver = Callable[[Node], "str | None"]


@dataclass(frozen=True)
class Constraint:
    attribute: str
    operator: str
    value: str = ""
    soft: bool = False
    weight: int = 0  # soft constraints only
    _check: Callable[[str | None], bool] = field(default=lambda _: True, compare=False,
                                                 repr=False)
    _resolve: Resolver = field(default=lambda _: None, compare=False, repr=False)

    def __str__(self) -> str:
        operator = ("~" if self.soft else "") + self.operator
        return " ".join(part for part in (self.attribute, operator, self.value) if part)

    def resolve(self, node: Node) -> str | None:
        return self._resolve(node)

    def matches(self, node: Node) -> bool:
        """For attribute operators: does ``node`` meet the constraint."""
        return self._check(self._resolve(node))

    def miss_reason(self, node: Node) -> str:
        found = self._resolve(node)
        has = "the attribute is not set" if found is None else f"the node has {found!r}"
        return f"constraint {self} not met: {has}"

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"attribute": self.attribute,
                                   "operator": ("~" if self.soft else "") + self.operator,
                                   "value": self.value}
        if self.soft:
            data["weight"] = self.weight
        return data


def parse_constraint(attribute: str, operator: str, value: str,
                     weight: int | None = None) -> Constraint:
    """A checked constraint; ValueError says which part is wrong and what to write."""
    soft = operator.startswith("~")
    operator = _ALIASES.get(operator.removeprefix("~"), operator.removeprefix("~"))
    if operator not in OPERATORS:
        raise ValueError(f"operator {operator!r} is unknown: use one of {', '.join(OPERATORS)}"
                         " (prefix an attribute operator with ~ for a soft constraint)")
    if soft and operator in PLACEMENT_OPERATORS:
        raise ValueError(f"operator ~{operator}: only attribute operators can be soft")
    if weight is not None and not soft:
        raise ValueError("weight is for soft constraints only (operators starting with ~)")
    if operator == "distinct_hosts":
        if attribute or value not in ("", "true", "false"):
            raise ValueError("distinct_hosts takes no attribute and a value of true or false")
        return Constraint("", operator, value or "true")
    resolve = _resolver(attribute)
    if operator == "distinct_property":
        if value and not (value.isdigit() and int(value) > 0):
            raise ValueError(f"distinct_property value {value!r} must be a positive integer "
                             "(how many allocations may share one property value)")
        return Constraint(attribute, operator, value or "1", _resolve=resolve)
    check = _checker(operator, value)
    return Constraint(attribute, operator, value, soft, weight or (50 if soft else 0),
                      check, resolve)


def _resolver(attribute: str) -> Resolver:
    target = _TARGET.match(attribute)
    if target is None:
        raise ValueError(f"attribute {attribute!r} is not one of ${{attr.<name>}}, "
                         "${meta.<key>}, ${node.unique.name}, ${node.unique.id}, "
                         "${node.datacenter}")
    path = target.group(1)
    if path.startswith("attr."):
        name = path.removeprefix("attr.")
        return lambda node: node.attributes.get(name)
    if path.startswith("meta."):
        key = path.removeprefix("meta.")
        return lambda node: node.meta.get(key)
    if path == "node.datacenter":
        return lambda node: node.datacenter
    return lambda node: node.name  # node.unique.name and node.unique.id: names are ids


def _checker(operator: str, value: str) -> Callable[[str | None], bool]:
    if operator == "is_set":
        _no_value(operator, value)
        return lambda found: found is not None
    if operator == "is_not_set":
        _no_value(operator, value)
        return lambda found: found is None
    if operator == "!=":
        return lambda found: found != value
    if not value:
        raise ValueError(f"operator {operator} needs a value")
    if operator == "=":
        return lambda found: found == value
    if operator in ("<", "<=", ">", ">="):
        return _order_checker(operator, value)
    if operator == "regexp":
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise ValueError(f"regexp {value!r} does not compile: {exc}") from None
        return lambda found: found is not None and pattern.search(found) is not None
    if operator in ("set_contains", "set_contains_any"):
        wanted = _items(value)
        test = all if operator == "set_contains" else any
        return lambda found: found is not None and test(w in _items(found) for w in wanted)
    clauses = parse_version_constraint(value)
    return lambda found: (version := parse_version(found)) is not None and all(
        clause(version) for clause in clauses)


def _no_value(operator: str, value: str) -> None:
    if value:
        raise ValueError(f"operator {operator} takes no value (got {value!r})")


def _items(text: str) -> set[str]:
    return {part.strip() for part in text.split(",") if part.strip()}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


_ORDER: dict[str, Callable[[object, object], bool]] = {
    "<": lambda a, b: a < b,  # type: ignore[operator]
    "<=": lambda a, b: a <= b,  # type: ignore[operator]
    ">": lambda a, b: a > b,  # type: ignore[operator]
    ">=": lambda a, b: a >= b,  # type: ignore[operator]
}


def _order_checker(operator: str, value: str) -> Callable[[str | None], bool]:
    compare = _ORDER[operator]
    wanted = _number(value)

    def check(found: str | None) -> bool:
        if found is None:
            return False
        number = _number(found)
        if wanted is not None and number is not None:
            return compare(number, wanted)
        return compare(found, value)

    return check


Version = tuple[int, ...]
_VERSION = re.compile(r"^\s*v?(\d+(?:\.\d+)*)")
_CLAUSE = re.compile(r"^\s*(=|!=|>=|<=|>|<|~>)?\s*v?(\d+(?:\.\d+)*)\s*$")


@functools.lru_cache(maxsize=4096)  # the same few kernel versions on every node
def parse_version(text: str | None) -> Version | None:
    """The numeric release of a version string ("6.1.0-13-amd64" -> (6, 1, 0))."""
    match = _VERSION.match(text or "")
    return None if match is None else _padded(match.group(1))


def _padded(text: str) -> Version:
    parts = tuple(int(p) for p in text.split("."))
    return parts + (0,) * (3 - len(parts))


def parse_version_constraint(text: str) -> list[Callable[[Version], bool]]:
    """``">= 1.2, < 3"`` as a list of tests; ValueError names the bad clause."""
    clauses: list[Callable[[Version], bool]] = []
    for part in text.split(","):
        match = _CLAUSE.match(part)
        if match is None:
            raise ValueError(f"version constraint {part.strip()!r} is not like '>= 1.2.0' "
                             "(operators =, !=, >, >=, <, <=, ~>)")
        operator, bound = match.group(1) or "=", match.group(2)
        clauses.append(_version_clause(operator, bound))
    return clauses


def _version_clause(operator: str, bound: str) -> Callable[[Version], bool]:
    low = _padded(bound)
    if operator == "~>":  # ~> 1.2 allows 1.x from 1.2; ~> 1.2.3 allows 1.2.x from 1.2.3
        given = [int(p) for p in bound.split(".")]
        keep = given[:max(1, len(given) - 1)]
        high = _padded(".".join(map(str, [*keep[:-1], keep[-1] + 1])))
        return lambda v: low <= v < high
    if operator == "=":
        return lambda v: v == low
    if operator == "!=":
        return lambda v: v != low
    compare = _ORDER[operator]
    return lambda v: compare(v, low)
