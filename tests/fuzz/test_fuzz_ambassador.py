"""Fuzzing of the ambassador's specs: ``BACKEND_<port>`` variables and
``connect.<port>`` labels of a container, a spec itself, and the spec a KV key
holds. Containers and KV writers are outside the agent: a bad spec is refused
with BadSpec (its message reaches the refused connection's log line) or listed
as a problem of the container, never an exception."""

from __future__ import annotations

import pytest
from fuzzing import FUZZ, corpus, digit_text, mutated_text
from hypothesis import given
from hypothesis import strategies as st

from consulate.proxy.ambassador_spec import (
    BadSpec,
    ServiceSpec,
    StaticSpec,
    container_rules,
    parse_kv_value,
    parse_spec,
)

pytestmark = pytest.mark.fuzz

SPECS = corpus("ambassador_specs")
specs = mutated_text(SPECS) | st.tuples(
    st.sampled_from(["10.0.0.5:", "consul://127.0.0.1:", "etcd://[", "consul://["]),
    digit_text, st.sampled_from(["", "/k", ",10.0.0.6:80"])).map("".join)
ports = st.sampled_from(["6379", "0", "65536", ""]) | digit_text | st.text(max_size=5)


@FUZZ
@given(specs)
def test_specs(text: str) -> None:
    try:
        spec = parse_spec(text)
    except BadSpec as exc:
        assert str(exc)
    else:
        if isinstance(spec, StaticSpec):
            assert all(0 < target.port < 65536 for target in spec.targets)


@FUZZ
@given(specs.map(str.encode) | st.binary(max_size=40))
def test_kv_values(raw: bytes) -> None:
    try:
        spec = parse_kv_value(raw, "key 'ambassador/redis'")
    except BadSpec as exc:
        assert str(exc)
    else:
        assert isinstance(spec, StaticSpec | ServiceSpec)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["BACKEND_", "BACKEND", "X_"]), ports,
                          st.sampled_from(["=", ""]), specs).map("".join), max_size=4),
       st.dictionaries(st.tuples(st.sampled_from(["connect.", "connect", "x."]), ports)
                       .map("".join), specs, max_size=4))
def test_container_rules(env: list[str], labels: dict[str, str]) -> None:
    rules = container_rules(env, labels)
    assert all(0 < port < 65536 for port in rules.specs)
