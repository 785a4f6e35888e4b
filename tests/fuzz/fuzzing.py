"""What every fuzz target shares: the example budget, the seed corpora and the
strategies that start from them (hypothesis)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

T = TypeVar("T")

CORPUS = Path(__file__).with_name("corpus")
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "2000")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def corpus(name: str) -> list[Any]:
    loaded: list[Any] = json.loads((CORPUS / f"{name}.json").read_text())
    return loaded


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=30)

# Numbers as a parser meets them: ASCII digits, and the other characters that
# str.isdigit() accepts: other scripts' digits (which int() reads) and superscripts,
# circled digits... (which int() refuses).
_OTHER_DIGITS = [chr(c) for c in range(0x80, 0x20000) if chr(c).isdigit()]
digit_text = st.text(st.sampled_from("0123456789") | st.sampled_from(_OTHER_DIGITS),
                     min_size=1, max_size=25)


def mutated_text(seeds: list[str]) -> st.SearchStrategy[str]:
    """A seed with a slice replaced by random text, or random text alone."""
    @st.composite
    def mutate(draw: st.DrawFn) -> str:
        seed = draw(st.sampled_from(seeds))
        start = draw(st.integers(0, len(seed)))
        end = draw(st.integers(start, len(seed)))
        return seed[:start] + draw(st.text(max_size=12) | digit_text) + seed[end:]
    return mutate() | st.text(max_size=80)


class Nested(bytes):
    """A JSON body nested ``depth`` levels deep: past what a recursive walk survives.
    Shown by its depth, not its bytes, when hypothesis reports it."""

    def __new__(cls, depth: int) -> Nested:
        made = super().__new__(cls, b"[" * depth + b"]" * depth)
        made.depth = depth
        return made

    depth: int

    def __repr__(self) -> str:
        return f"Nested({self.depth})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def nested(depth: int) -> bytes:
    return Nested(depth)


class LoopRunner:
    """One event loop for all the examples of a target, so that a real server
    started once serves every example (hypothesis calls the test synchronously)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, awaitable: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await awaitable
        return self.loop.run_until_complete(wrapped())

    def close(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


@contextlib.contextmanager
def loop_runner() -> Iterator[LoopRunner]:
    runner = LoopRunner()
    try:
        yield runner
    finally:
        runner.close()
