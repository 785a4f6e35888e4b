"""Ordering, trimming and caching answers: weighted sampling, fitting, rotations.

The property test draws random service sets, weights, EDNS sizes and transports,
and checks what must hold for every answer: it fits what the client can take,
every SRV target has its glue, and TC is set exactly when records were cut.
"""

from __future__ import annotations

import collections
import ipaddress
import random

from dnslib import EDNS0, QTYPE, RR, A, DNSRecord
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from consulate.dns.answer import Responder
from consulate.dns.cache import REFRESH, VARIANTS, Rotation
from consulate.dns.config import DnsConfig
from consulate.dns.records import Unit
from consulate.dns.truncate import fit, weighted_order
from consulate.dns.wire import STREAM, size_limit
from consulate.proxy.table import Endpoint, RouteTable
from consulate.proxy.vip import VipAllocator


def unit(name: str, weight: int = 1) -> Unit:
    return Unit(weight, RR(f"{name}.example.", QTYPE.A, rdata=A("10.0.0.1")))


def test_weighted_order_draws_in_proportion_to_weight() -> None:
    units = [unit("a", 1), unit("b", 2), unit("c", 7)]
    rng = random.Random(3)
    first = collections.Counter(str(weighted_order(units, rng)[0].record.rname)
                                for _ in range(20000))
    shares = {name: count / 20000 for name, count in first.items()}
    assert abs(shares["a.example."] - 0.1) < 0.02
    assert abs(shares["b.example."] - 0.2) < 0.02
    assert abs(shares["c.example."] - 0.7) < 0.02


def test_weighted_order_is_a_permutation() -> None:
    units = [unit(str(i), i + 1) for i in range(20)]
    assert sorted(map(id, weighted_order(units, random.Random(1)))) == sorted(map(id, units))
    assert weighted_order(units[:1], random.Random(1)) == units[:1]


def test_fit_keeps_the_longest_prefix_and_sends_shared_glue_once() -> None:
    glue = RR("t.example.", QTYPE.A, rdata=A("10.9.9.9"))
    units = [Unit(1, RR(f"n{i}.example.", QTYPE.A, rdata=A("10.0.0.1")), (glue,))
             for i in range(40)]
    reply = DNSRecord.question("x.example.").reply()
    whole = DNSRecord.parse(fit(reply, units, STREAM))
    assert (whole.header.tc, len(whole.rr), len(whole.ar)) == (0, 40, 1)
    cut = fit(reply, units, 512)
    parsed = DNSRecord.parse(cut)
    assert parsed.header.tc == 1 and len(cut) <= 512 and len(parsed.ar) == 1
    assert [str(rr.rname) for rr in parsed.rr] == [f"n{i}.example." for i in
                                                   range(len(parsed.rr))]
    one_more = fit(reply, units[:len(parsed.rr) + 1], STREAM)
    assert len(one_more) > 512
    assert reply.rr == [] and reply.ar == [] and reply.header.tc == 0  # left as given


def test_rotation_builds_variants_then_serves_them_in_turn_and_refreshes() -> None:
    built = iter(range(10_000))
    rotation = Rotation(lambda: str(next(built)).encode())
    assert rotation.first() == b"0"
    served = [rotation.next() for _ in range(VARIANTS - 1)]
    assert served == [str(i).encode() for i in range(1, VARIANTS)]  # one new per query
    turn = VARIANTS - 1
    while turn + 1 < REFRESH:
        turn += 1
        assert rotation.next() in {str(i).encode() for i in range(VARIANTS)}
    assert rotation.next() == str(VARIANTS).encode()  # the REFRESH-th query repacks a slot


# -- the property test ------------------------------------------------------------

OWN_ADDRESS = "10.200.0.1"
endpoint = (
    st.tuples(
        st.integers(min_value=1, max_value=65535),  # weight
        st.one_of(st.just(OWN_ADDRESS),
                  st.integers(0x0A000000, 0x0AFFFFFF).map(
                      lambda n: str(ipaddress.IPv4Address(n)))),
        st.integers(min_value=1, max_value=65535),  # port
        st.sampled_from(["h1", "h2", ""]),          # node
    )
)
# A size drawn first, so big sets (that must be cut) are as likely as small ones.
endpoints = st.integers(min_value=1, max_value=300).flatmap(
    lambda n: st.lists(endpoint, min_size=n, max_size=n))


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(members=endpoints,
       qtype=st.sampled_from(["SRV", "A"]),
       edns=st.one_of(st.none(), st.integers(min_value=0, max_value=65535)),
       max_udp=st.one_of(st.integers(min_value=512, max_value=4096), st.just(STREAM)),
       seed=st.integers(min_value=0, max_value=2**32))
def test_every_answer_fits_has_its_glue_and_says_when_it_was_cut(
    members: list[tuple[int, str, int, str]], qtype: str, edns: int | None, max_udp: int,
    seed: int,
) -> None:
    table = RouteTable(VipAllocator("240.0.0.0/4"))
    table.replace_all(Endpoint("svc", f"svc-{i}", address, port, node=node, weight=weight)
                      for i, (weight, address, port, node) in enumerate(members))
    responder = Responder(table, DnsConfig(node="h1", node_address=OWN_ADDRESS,
                                           a_records="instances"), rng=random.Random(seed))
    asked = DNSRecord.question("svc.service.consul", qtype)
    if edns is not None:
        asked.add_ar(EDNS0(udp_len=edns))
    raw = responder.answer(bytes(asked.pack()), max_udp)
    assert raw
    reply = DNSRecord.parse(raw)

    client_size = STREAM if max_udp == STREAM else (
        512 if edns is None else min(max(edns, 512), max_udp))
    assert len(raw) <= client_size
    assert len(raw) <= size_limit(edns, max_udp)
    if qtype == "SRV":
        expected = len(members)
        targets = [str(rr.rdata.target) for rr in reply.rr]
        glue = {str(rr.rname): str(rr.rdata) for rr in reply.ar if rr.rtype == QTYPE.A}
        assert set(targets) <= set(glue)
        assert len(glue) == len(set(targets))  # no glue without its SRV
        sent = collections.Counter((rr.rdata.weight, rr.rdata.port, glue[str(rr.rdata.target)])
                                   for rr in reply.rr)
        registered = collections.Counter((w, port, a) for w, a, port, _ in members)
        assert sent <= registered  # each SRV is an instance, with its weight and port
    else:
        expected = len({address for _, address, _, _ in members})
        assert len({str(rr.rdata) for rr in reply.rr}) == len(reply.rr)  # no duplicates
    assert len(reply.rr) <= expected
    assert reply.header.tc == (len(reply.rr) < expected)
    event("cut" if reply.header.tc else "whole")
