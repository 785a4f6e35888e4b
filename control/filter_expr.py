"""Consul's ``?filter=`` expressions (go-bexpr), parsed and evaluated without I/O.

Grammar, as Consul documents it: matches joined by ``and``, ``or``, ``not`` and
parentheses (``not`` binds tighter than ``and``, ``and`` tighter than ``or``);
a match is one of

    <Selector> == <Value>          <Selector> != <Value>
    <Selector> is empty            <Selector> is not empty
    <Value> in <Selector>          <Value> not in <Selector>
    <Selector> contains <Value>    <Selector> not contains <Value>
    <Selector> matches <Value>     <Selector> not matches <Value>

A selector is a dotted path into the JSON of one result (``Service.Tags``,
``Service.Meta.version``, ``Checks.Status``); a value is a double-quoted or
backquoted string, or a bare word. A path that crosses a list (``Checks.Status``)
matches when any element does; the negated forms are the negations of the
positive ones. ``in``/``contains`` test membership in a list, a key of a map, or
a substring of a string.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Predicate = Callable[[dict[str, Any]], bool]

_TOKEN = re.compile(r'''\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<op>==|!=)
                    |(?P<paren>[()])|(?P<word>[^\s()"`=!]+))''', re.VERBOSE)
_KEYWORDS = {"and", "or", "not", "is", "empty", "in", "contains", "matches"}
_MISSING = object()


class FilterError(ValueError):
    """The expression cannot be used; the message says where and why."""


@dataclass(frozen=True)
class _Token:
    kind: str  # "value" (quoted), "word", "op", "paren"
    text: str


def _tokens(text: str) -> list[_Token]:
    found, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            rest = text[position:]
            if rest.strip() == "":
                break
            offset = position + len(rest) - len(rest.lstrip())
            raise FilterError(f"unexpected character {text[offset]!r} at offset {offset}")
        position = match.end()
        if match.group("string") is not None:
            found.append(_Token("value", re.sub(r"\\(.)", r"\1", match.group("string")[1:-1])))
        elif match.group("raw") is not None:
            found.append(_Token("value", match.group("raw")[1:-1]))
        elif match.group("op") is not None:
            found.append(_Token("op", match.group("op")))
        elif match.group("paren") is not None:
            found.append(_Token("paren", match.group("paren")))
        else:
            found.append(_Token("word", match.group("word")))
    return found


def _select(document: Any, path: tuple[str, ...]) -> list[Any]:
    """Every value the path reaches (more than one across lists); [] if none."""
    current = [document]
    for key in path:
        following = []
        for value in current:
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, dict) and key in item:
                    following.append(item[key])
        current = following
    return current


def _equal(found: Any, wanted: str) -> bool:
    if isinstance(found, bool):
        return wanted == ("true" if found else "false")
    if isinstance(found, (int, float)):
        try:
            return float(wanted) == found
        except ValueError:
            return False
    return isinstance(found, str) and found == wanted


def _holds(found: Any, wanted: str) -> bool:
    if isinstance(found, list):
        return any(_equal(item, wanted) for item in found)
    if isinstance(found, dict):
        return wanted in found
    return isinstance(found, str) and wanted in found


def _empty(found: list[Any]) -> bool:
    return all(value in ("", None) or value == [] or value == {} for value in found)


class _Parser:
    def __init__(self, tokens: list[_Token], fields: frozenset[str]) -> None:
        self._tokens = tokens
        self._at = 0
        self._fields = fields

    def parse(self) -> Predicate:
        if not self._tokens:
            raise FilterError("the expression is empty")
        predicate = self._or()
        if self._at != len(self._tokens):
            raise FilterError(f"unexpected {self._tokens[self._at].text!r} after a complete "
                              "expression")
        return predicate

    def _peek(self, offset: int = 0) -> _Token | None:
        index = self._at + offset
        return self._tokens[index] if index < len(self._tokens) else None

    def _is_word(self, word: str, offset: int = 0) -> bool:
        token = self._peek(offset)
        return token is not None and token.kind == "word" and token.text == word

    def _next(self, what: str) -> _Token:
        token = self._peek()
        if token is None:
            raise FilterError(f"the expression ends where {what} was expected")
        self._at += 1
        return token

    def _or(self) -> Predicate:
        parts = [self._and()]
        while self._is_word("or"):
            self._at += 1
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else (lambda d: any(p(d) for p in parts))

    def _and(self) -> Predicate:
        parts = [self._not()]
        while self._is_word("and"):
            self._at += 1
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else (lambda d: all(p(d) for p in parts))

    def _not(self) -> Predicate:
        if self._is_word("not"):
            self._at += 1
            inner = self._not()
            return lambda d: not inner(d)
        token = self._peek()
        if token is not None and token.kind == "paren" and token.text == "(":
            self._at += 1
            inner = self._or()
            closing = self._next("')'")
            if closing.text != ")":
                raise FilterError(f"expected ')', got {closing.text!r}")
            return inner
        return self._match()

    def _selector(self) -> tuple[str, ...]:
        token = self._next("a selector")
        if token.kind != "word" or token.text in _KEYWORDS:
            raise FilterError(f"expected a selector such as Service.Tags, got {token.text!r}")
        path = tuple(token.text.split("."))
        if path[0] not in self._fields or "" in path:
            raise FilterError(f"Selector {token.text!r} is not valid: selectors start with "
                              f"one of {', '.join(sorted(self._fields))}")
        return path

    def _value(self) -> str:
        token = self._next("a value")
        if token.kind not in ("value", "word") or (token.kind == "word"
                                                   and token.text in _KEYWORDS):
            raise FilterError(f"expected a value, got {token.text!r}")
        return token.text

    def _match(self) -> Predicate:
        first = self._peek()
        # <Value> [not] in <Selector>
        if first is not None and (self._is_word("in", 1) or (
                self._is_word("not", 1) and self._is_word("in", 2))):
            wanted = self._value()
            negate = self._is_word("not")
            self._at += 2 if negate else 1
            path = self._selector()
            return self._negated(negate, lambda d: any(_holds(v, wanted)
                                                       for v in _select(d, path)))
        path = self._selector()
        token = self._next("an operator (==, !=, is, contains, matches, in)")
        if token.kind == "op":
            wanted = self._value()
            return self._negated(token.text == "!=", lambda d: any(
                _equal(v, wanted) for v in _select(d, path)))
        if token.kind == "word" and token.text == "is":
            negate = self._is_word("not")
            if negate:
                self._at += 1
            if not self._is_word("empty"):
                raise FilterError("expected 'empty' after 'is'")
            self._at += 1
            return self._negated(negate, lambda d: _empty(_select(d, path)))
        negate = token.kind == "word" and token.text == "not"
        if negate:
            token = self._next("contains or matches")
        if token.kind == "word" and token.text == "contains":
            wanted = self._value()
            return self._negated(negate, lambda d: any(_holds(v, wanted)
                                                       for v in _select(d, path)))
        if token.kind == "word" and token.text == "matches":
            pattern_text = self._value()
            try:
                pattern = re.compile(pattern_text)
            except re.error as exc:
                raise FilterError(f"bad regular expression {pattern_text!r}: {exc}") from None
            return self._negated(negate, lambda d: any(
                isinstance(v, str) and pattern.search(v) is not None
                for v in _select(d, path)))
        raise FilterError(f"unknown operator {token.text!r}: use ==, !=, is empty, "
                          "is not empty, in, not in, contains, not contains, matches")

    @staticmethod
    def _negated(negate: bool, predicate: Predicate) -> Predicate:
        return (lambda d: not predicate(d)) if negate else predicate


def compile_filter(text: str, fields: Iterable[str]) -> Predicate:
    """A predicate over result documents; ``fields`` are the valid first selector parts."""
    try:
        return _Parser(_tokens(text), frozenset(fields)).parse()
    except FilterError as exc:
        raise FilterError(f"Failed to create boolean expression evaluator: {exc}") from None
