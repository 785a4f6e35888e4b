"""Packed answers kept per query key, so that a repeated query builds no message.

An entry holds the reply without its 2-byte ID; the responder prepends the ID of
the query it answers. The whole cache is dropped when the route table's version
changes, so a registry change is seen by the very next query.

Answers with several records must still come in a different order per query
(clients that take the first address spread their load, and a trimmed answer keeps
a different weighted sample of instances). A ``Rotation`` keeps up to ``VARIANTS``
packings of such an answer, each with its own order, serves them in turn, and
repacks one every ``REFRESH`` queries so that over time every instance gets its
share of the samples; the hot path still only looks up and concatenates bytes.
"""

from __future__ import annotations

from collections.abc import Callable

VARIANTS = 8
REFRESH = 256
# An entry per (question as sent, flags, size limit): random names or 0x20 case
# variants could grow this without bound, so it is emptied when it gets this big.
MAX_ENTRIES = 50_000


class Forward:
    """The cache entry of a query that goes to the recursors."""


FORWARD_ENTRY = Forward()


class Rotation:
    """Several packings of one answer, served in turn; ``build`` makes another."""

    __slots__ = ("_build", "_turn", "_variants")

    def __init__(self, build: Callable[[], bytes]) -> None:
        self._build = build
        self._variants = [build()]
        self._turn = 0

    def first(self) -> bytes:
        return self._variants[0]

    def next(self) -> bytes:
        self._turn += 1
        variants = self._variants
        if len(variants) < VARIANTS:
            variants.append(self._build())
            return variants[-1]
        slot = self._turn % VARIANTS
        if self._turn % REFRESH == 0:
            variants[slot] = self._build()
        return variants[slot]


Entry = bytes | Rotation | Forward


class AnswerCache:
    """Entries by key for one route table version, a table per transport (a key is
    unique only within its transport, see wire.query_key)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.udp: dict[bytes, Entry] = {}
        self.stream: dict[bytes, Entry] = {}
        self.version = -1
        self._max_entries = max_entries

    def reset(self, version: int) -> None:
        self.udp, self.stream = {}, {}
        self.version = version

    def put(self, entries: dict[bytes, Entry], key: bytes, entry: Entry) -> None:
        """Store in ``entries`` (``udp`` or ``stream``), emptying it first when full."""
        if len(entries) >= self._max_entries:
            entries.clear()
        entries[key] = entry
