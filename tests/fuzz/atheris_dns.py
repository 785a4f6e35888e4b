"""Coverage-guided fuzzing of the DNS responder with atheris (libFuzzer), run as
its own process by test_fuzz_dns_atheris: ``python atheris_dns.py [libFuzzer
options] CORPUS_DIR SEED_DIR``.

Hypothesis mutates packets at random; libFuzzer keeps the inputs that reach new
branches of the packet parser (consulate.dns and dnslib, both instrumented), so
it gets into the deeper parts of the wire format (compression pointers, EDNS
options, section counts) that random bytes seldom reach. A reply that is not
silence, FORWARD or a response with the query's ID is a crash, as is any
exception: libFuzzer then writes the input to ``-artifact_prefix``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the DNS fixtures

with atheris.instrument_imports(include=["consulate.dns", "dnslib"]):
    from test_dns_fuzz import check, responder

SUBJECT = responder()


def one_input(packet: bytes) -> None:
    for size in (512, 1232):
        check(packet, SUBJECT.answer(packet, size))


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
