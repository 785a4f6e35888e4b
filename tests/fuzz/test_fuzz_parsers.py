"""Fuzzing of the pure parsers of outside input (``make fuzz``, not ``make test``;
README.md lists the other targets).

Each target feeds hypothesis-generated and mutated inputs, starting from the seed
corpus in ``corpus/``, and checks the parser's contract: it returns, or it raises
the one error type that carries a message for the user; never anything else, and
never a changed input. The number of examples per target is ``FUZZ_EXAMPLES``
(2,000 by default), which bounds the run. A crash found here becomes a regression
test next to the parser's unit tests, with the input hypothesis printed.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from fuzzing import FUZZ, corpus, digit_text, json_values, mutated_text
from hypothesis import given
from hypothesis import strategies as st

from consulate.control.blocking import blocking_query
from consulate.control.configurator.jsonpatch import PatchError, apply_patch
from consulate.control.duplex.frames import Decoder, ProtocolError
from consulate.control.filter_expr import FilterError, compile_filter
from consulate.control.registrator.derive import service_metadata, split_tags
from consulate.control.service_definition import InvalidDefinition, parse_registration

pytestmark = pytest.mark.fuzz


# -- DNS packets (the responder) ----------------------------------------------------------


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 2**32 - 1))
def test_dns_packets(noise: bytes, seed: int) -> None:
    from test_dns_fuzz import check, mutate, responder, seeds
    rng = random.Random(seed)
    subject = responder()
    for packet in (noise, mutate(rng.choice(seeds()), rng)):
        check(packet, subject.answer(packet, 512))


# -- duplex frames ---------------------------------------------------------------------------


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_duplex_frames(chunks: list[bytes]) -> None:
    decoder = Decoder(max_frame_size=4096)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
    except ProtocolError as exc:
        assert str(exc)


# -- HTTP bodies and query strings -------------------------------------------------------------


@FUZZ
@given(st.one_of(st.sampled_from(corpus("registration")), json_values,
                 st.dictionaries(st.sampled_from(["ID", "Name", "Port", "Address", "Tags",
                                                  "Meta", "Check", "Checks", "Weights"]),
                                 json_values, max_size=6)))
def test_service_registration_bodies(body: Any) -> None:
    before = copy.deepcopy(body)
    try:
        parse_registration(body, node="n1", default_address="10.0.0.1")
    except InvalidDefinition as exc:
        assert str(exc)
    assert body == before


@FUZZ
@given(mutated_text(corpus("query")))
def test_blocking_query_strings(query: str) -> None:
    request = make_mocked_request("GET", "/v1/catalog/services?" + query)
    try:
        found = blocking_query(request)
    except web.HTTPBadRequest as exc:
        assert exc.text
    else:
        assert found is None or (found[0] >= 0 and 0 <= found[1] <= 600 * 17 / 16)


@FUZZ
@given(mutated_text(corpus("filter")))
def test_filter_expressions(text: str) -> None:
    document = {"Service": {"ID": "web-1", "Tags": ["v1"], "Meta": {"version": "1.2"},
                            "Port": 80}, "Checks": [{"Status": "passing"}],
                "Node": {"Node": "h1"}}
    try:
        keep = compile_filter(text, ("Service", "Checks", "Node"))
    except FilterError as exc:
        assert str(exc).startswith("Failed to create boolean expression evaluator: ")
    else:
        assert keep(document) in (True, False)


# -- registrator's SERVICE_* grammar -----------------------------------------------------------


@FUZZ
@given(st.one_of(st.sampled_from(corpus("service_env")),
                 st.lists(st.text(max_size=30).map(lambda t: "SERVICE_" + t), max_size=8)),
       st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=4),
       st.text(max_size=6))
def test_service_attributes(env: list[str], labels: dict[str, str], port: str) -> None:
    attributes, specific = service_metadata(env, labels, port)
    assert specific <= set(attributes)
    for value in attributes.values():
        assert isinstance(split_tags(value), list)


# -- configurator documents and JSON Patch -----------------------------------------------------


@FUZZ
@given(st.one_of(st.sampled_from(corpus("patch")), json_values,
                 st.lists(st.fixed_dictionaries(
                     {"op": st.sampled_from(["add", "remove", "replace", "move", "copy",
                                             "test", "nope"]),
                      "path": st.sampled_from(["", "/", "/port", "/upstreams/0",
                                               "/upstreams/-", "/a/b", "/~", "/upstreams/9"])
                      | digit_text.map(lambda index: "/upstreams/" + index)},
                     optional={"value": json_values,
                               "from": st.sampled_from(["/port", "/upstreams", "/x"])}),
                     max_size=4)))
def test_json_patch(patch: Any) -> None:
    document = {"port": 80, "upstreams": ["10.0.0.5:80", "10.0.0.6:80"], "a": {"b": 1}}
    before = copy.deepcopy(document)
    try:
        apply_patch(document, patch)
    except PatchError as exc:
        assert str(exc)
    assert document == before  # a failed or applied patch never touches its input
