"""Ordering an answer's records and fitting them into the size the client can take.

Consul trims big UDP answers silently, so clients never learn that instances are
missing; here a trimmed answer always has TC=1 (RFC 2181 9), so a resolver can
retry over TCP for the whole set, and the records kept are drawn by weighted
random sampling, so that clients that only ever see a trimmed answer still spread
their load as the weights say (the selection of RFC 2782, applied to the set).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from dnslib import RR, DNSRecord

from consulate.dns.records import Unit


def weighted_order(units: Sequence[Unit], rng: random.Random) -> list[Unit]:
    """A random order in which each next unit is drawn among those left with a
    probability proportional to its weight (weights are at least 1).

    Sorting by ``u ** (1 / weight)`` for uniform ``u`` gives exactly that
    distribution in one pass (Efraimidis and Spirakis, 2006). With equal weights it
    is a plain shuffle, which also spreads clients that take the first address.
    """
    if len(units) < 2:
        return list(units)
    return sorted(units, key=lambda unit: rng.random() ** (1.0 / unit.weight), reverse=True)


def fit(reply: DNSRecord, units: Sequence[Unit], limit: int) -> bytes:
    """``reply`` packed with the longest prefix of ``units`` that fits in ``limit`` bytes.

    Each unit comes with its glue, and glue shared by several units is sent once,
    so every target in the answer has its address. TC is set exactly when a unit
    was left out. ``reply`` carries the header, question, authority and the
    additional records that are always sent (the OPT record); it is left as given.
    """
    fixed = list(reply.ar)
    try:
        whole = _packed(reply, units, fixed)
        if len(whole) <= limit:
            return whole
        fits, cut = 0, len(units)  # invariant: prefix `fits` fits, prefix `cut` does not
        while cut - fits > 1:
            middle = (fits + cut) // 2
            if len(_packed(reply, units[:middle], fixed)) <= limit:
                fits = middle
            else:
                cut = middle
        reply.header.tc = 1
        return _packed(reply, units[:fits], fixed)
    finally:
        reply.header.tc = 0
        reply.rr = []
        reply.ar = fixed


def _packed(reply: DNSRecord, units: Sequence[Unit], fixed: list[RR]) -> bytes:
    glue: dict[int, RR] = {}
    for unit in units:
        for record in unit.glue:
            glue.setdefault(id(record), record)
    reply.rr = [unit.record for unit in units]
    reply.ar = [*glue.values(), *fixed]
    return bytes(reply.pack())
