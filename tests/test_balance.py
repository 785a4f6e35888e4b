"""The balancers of proxy/balance.py, pure: exact sequences, distributions with fixed seeds.

native/relay.c mirrors them; tests/test_balance_mesh.py checks both relays end to end.
"""

from __future__ import annotations

import collections
import ipaddress
import random
from dataclasses import dataclass

import pytest

from consulate.proxy.balance import (
    LB_NAMES,
    LeastConn,
    PickContext,
    PowerOfTwoChoices,
    RendezvousHash,
    RoundRobin,
    SmoothWeighted,
    hash_score,
    new_balancer,
    resolve_lb,
)
from consulate.proxy.pool import ServicePool


@dataclass(frozen=True)
class Ep:
    name: str
    address: str
    port: int = 80
    weight: int = 1


A, B, C, D = (Ep(n, f"10.0.0.{i}") for i, n in enumerate("abcd", start=1))


def names(endpoints: list[Ep]) -> str:
    return "".join(e.name for e in endpoints)


def key(endpoint: Ep) -> tuple[str, int]:
    return endpoint.address, endpoint.port


def client_ip(n: int) -> int:
    return int(ipaddress.IPv4Address("10.100.0.0")) + n


@pytest.mark.parametrize(("meta", "expected"), [
    ("", ("round_robin", None)),
    ("hash", ("hash", None)),
    (" Least_Conn ", ("least_conn", None)),
    ("weighted", ("weighted", None)),
    ("p2c", ("p2c", None)),
    ("fastest", ("round_robin", "lb='fastest' is not a balancer: use one of "
                 "round_robin|least_conn|p2c|hash|weighted; using round_robin")),
])
def test_lb_meta_names_a_balancer_or_gets_round_robin_with_a_reason(
        meta: str, expected: tuple[str, str | None]) -> None:
    assert resolve_lb(meta) == expected


def test_every_name_makes_its_balancer() -> None:
    kinds = [type(new_balancer(name)) for name in LB_NAMES]
    assert kinds == [RoundRobin, LeastConn, PowerOfTwoChoices, RendezvousHash, SmoothWeighted]


def test_round_robin_steps_over_ejected_endpoints() -> None:
    rr = RoundRobin()
    out = PickContext(ejected={key(B)})
    assert [names(rr.candidates([A, B, C], 3, out)) for _ in range(4)] == ["ac", "ca", "ac", "ca"]
    assert names(rr.candidates([A, B, C], 3)) == "abc"  # b back: the turn goes on from a
    # Every endpoint ejected: all are used rather than none (Envoy's panic mode).
    assert names(rr.candidates([A, B], 2, PickContext(ejected={key(A), key(B)}))) == "ba"


def test_least_conn_picks_fewest_open_and_rotates_ties() -> None:
    lc = LeastConn()
    busy = PickContext(active={key(A): 2, key(C): 1})
    assert names(lc.candidates([A, B, C], 3, busy)) == "bca"
    assert [names(LeastConn().candidates([A, B, C], 1))] == ["a"]
    idle = LeastConn()
    assert [names(idle.candidates([A, B, C], 1)) for _ in range(4)] == ["a", "b", "c", "a"]
    skip = PickContext(active={key(A): 5}, ejected={key(B)})
    assert names(LeastConn().candidates([A, B, C], 3, skip)) == "ca"


def test_p2c_of_two_is_least_conn_and_prefers_the_first_drawn_on_ties() -> None:
    p2c = PowerOfTwoChoices(random.Random(1))
    loaded = PickContext(active={key(A): 3, key(B): 1})
    assert [names(p2c.candidates([A, B], 2, loaded)) for _ in range(20)] == ["ba"] * 20
    assert names(p2c.candidates([A, B, C], 3, PickContext(ejected={key(A), key(C)}))) == "b"


def test_p2c_never_picks_the_busiest_and_spreads_evenly_among_equals() -> None:
    p2c = PowerOfTwoChoices(random.Random(7))
    busy = PickContext(active={key(D): 100})
    picks = collections.Counter(
        p2c.candidates([A, B, C, D], 3, busy)[0].name for _ in range(3000))
    assert set(picks) == {"a", "b", "c"}  # d loses every draw it is in
    assert all(900 <= n <= 1100 for n in picks.values()), picks
    order = p2c.candidates([A, B, C, D], 4, busy)
    assert len({e.name for e in order}) == 4  # retries: the other drawn, then the rest


def test_weighted_interleaves_as_nginx_smooth_wrr() -> None:
    sw = SmoothWeighted()
    heavy = Ep("a", "10.0.0.1", weight=5)
    picks = [sw.candidates([heavy, B, C], 3)[0].name for _ in range(14)]
    assert "".join(picks) == "aabacaa" * 2
    assert names(sw.candidates([heavy, B, C], 3)) == "abc"  # retries after the pick
    three_to_one = SmoothWeighted()
    a3 = Ep("a", "10.0.0.1", weight=3)
    assert "".join(three_to_one.candidates([a3, B], 1)[0].name for _ in range(8)) == "aaba" * 2


def test_weighted_skips_ejected_and_forgets_endpoints_that_left() -> None:
    sw = SmoothWeighted()
    heavy = Ep("a", "10.0.0.1", weight=5)
    out = PickContext(ejected={key(heavy)})
    assert "".join(sw.candidates([heavy, B, C], 1, out)[0].name for _ in range(4)) == "bcbc"
    assert "".join(sw.candidates([B, C], 1)[0].name for _ in range(2)) == "bc"


def test_hash_keeps_each_client_on_one_endpoint_and_spreads_clients() -> None:
    hashing = RendezvousHash()
    pool = [A, B, C, D]
    first = {n: hashing.candidates(pool, 1, PickContext(client=client_ip(n)))[0]
             for n in range(4000)}
    again = {n: hashing.candidates(pool, 1, PickContext(client=client_ip(n)))[0]
             for n in range(4000)}
    assert first == again
    shares = collections.Counter(e.name for e in first.values())
    assert all(900 <= n <= 1100 for n in shares.values()), shares


def test_hash_removing_an_endpoint_moves_only_its_clients() -> None:
    hashing = RendezvousHash()
    before = {n: hashing.candidates([A, B, C, D], 4, PickContext(client=client_ip(n)))
              for n in range(2000)}
    after = {n: hashing.candidates([A, B, D], 1, PickContext(client=client_ip(n)))[0]
             for n in range(2000)}
    for n, order in before.items():
        expected = order[0] if order[0] is not C else order[1]  # c's clients: their 2nd
        assert after[n] is expected
    moved = sum(order[0] is C for order in before.values())
    assert 400 <= moved <= 600


def test_hash_order_is_by_score_and_skips_ejected() -> None:
    client = client_ip(42)
    ranked = sorted([A, B, C, D], key=lambda e: -hash_score(client, e))
    context = PickContext(client=client)
    assert RendezvousHash().candidates([A, B, C, D], 3, context) == ranked[:3]
    out = PickContext(client=client, ejected={key(ranked[0])})
    assert RendezvousHash().candidates([A, B, C, D], 3, out) == ranked[1:4]


def test_no_endpoints_no_candidates() -> None:
    for name in LB_NAMES:
        assert new_balancer(name).candidates([], 3, PickContext()) == []


def test_pool_counts_open_connections_for_least_conn() -> None:
    pool = ServicePool("least_conn")
    endpoints = (A, B)
    first = pool.candidates(endpoints, 2, "10.1.1.1")[0]
    pool.connecting(first)
    second = pool.candidates(endpoints, 2, "10.1.1.1")[0]
    pool.connecting(second)
    assert {first.name, second.name} == {"a", "b"}
    pool.connecting(A)
    assert pool.candidates(endpoints, 1, "10.1.1.1") == [B]
    pool.closed(A)
    pool.closed(A)
    assert pool.active == {key(B): 1}
    assert pool.candidates(endpoints, 1, "10.1.1.1") == [A]


def test_pool_hashes_the_client_address() -> None:
    pool = ServicePool("hash")
    endpoints = (A, B, C, D)
    expected = RendezvousHash().candidates(
        endpoints, 2, PickContext(client=int(ipaddress.IPv4Address("10.100.1.14"))))
    assert pool.candidates(endpoints, 2, "10.100.1.14") == expected
