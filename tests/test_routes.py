"""RouteTable, VIP allocation and round robin, without sockets."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from consulate.control.agent import apply_change
from consulate.control.registry import Change, Instance
from consulate.proxy.balance import RoundRobin
from consulate.proxy.table import Endpoint, RouteTable
from consulate.proxy.vip import VipAllocator, VipRangeExhausted

IP = ipaddress.IPv4Address


def ep(service: str, ident: str, address: str = "10.0.0.1", port: int = 80) -> Endpoint:
    return Endpoint(service=service, id=ident, address=address, port=port)


def test_vip_is_a_stable_hash_inside_the_range_and_persists(tmp_path: Path) -> None:
    state = tmp_path / "vips.json"
    first = VipAllocator("240.0.0.0/4", state)
    web = first.vip_for("web")
    assert web in ipaddress.IPv4Network("240.0.0.0/4")
    assert first.vip_for("web") == web
    # Another host (no shared state) picks the same address for the same name.
    assert VipAllocator("240.0.0.0/4").vip_for("web") == web
    assert json.loads(state.read_text()) == {"web": str(web)}
    again = VipAllocator("240.0.0.0/4", state)
    assert again.name_for(web) == "web"


def test_vip_collisions_probe_and_exhaustion_is_reported(tmp_path: Path) -> None:
    vips = VipAllocator("240.0.0.0/30", tmp_path / "v.json")  # 2 usable addresses
    a, b = vips.vip_for("a"), vips.vip_for("b")
    assert {a, b} == {IP("240.0.0.1"), IP("240.0.0.2")}  # never .0 or .3
    with pytest.raises(VipRangeExhausted, match="no free address left in VIP range"):
        vips.vip_for("c")


def test_vips_outside_a_changed_range_are_dropped(tmp_path: Path) -> None:
    state = tmp_path / "v.json"
    state.write_text(json.dumps({"web": "240.1.2.3", "old": "10.0.0.9"}))
    vips = VipAllocator("240.0.0.0/4", state)
    assert vips.vip_for("web") == IP("240.1.2.3")
    assert vips.name_for(IP("10.0.0.9")) is None


def test_round_robin_rotates_and_gives_distinct_retry_candidates() -> None:
    rr = RoundRobin()
    items = ["a", "b", "c"]
    assert rr.candidates(items, 3) == ["a", "b", "c"]
    assert rr.candidates(items, 3) == ["b", "c", "a"]
    assert rr.candidates(items, 2) == ["c", "a"]
    assert rr.candidates(items, 5) == ["a", "b", "c"]
    assert rr.candidates([], 3) == []
    assert rr.candidates(["a", "b"], 1) == ["b"]


def test_table_upsert_remove_and_versions() -> None:
    table = RouteTable(VipAllocator("240.0.0.0/4"))
    seen: list[int] = []
    unsubscribe = table.subscribe(seen.append)
    table.upsert(ep("web", "w2", "10.0.0.2"))
    table.upsert(ep("web", "w1", "10.0.0.1"))
    web = table.service("web")
    assert web is not None
    assert [e.id for e in web.endpoints] == ["w1", "w2"]  # ordered by id
    assert table.service_by_vip(web.vip) is web
    assert table.service_folded("WEB") is web
    table.upsert(ep("web", "w1", "10.0.0.9"))  # update in place
    assert [e.address for e in web.endpoints] == ["10.0.0.9", "10.0.0.2"]
    table.remove("w1")
    table.remove("unknown")  # no change, no version bump
    assert [e.id for e in web.endpoints] == ["w2"]
    assert seen == [1, 2, 3, 4]
    unsubscribe()
    table.remove("w2")
    assert seen == [1, 2, 3, 4]
    assert table.version == 5
    # A service without endpoints keeps its VIP: clients are refused, not misrouted.
    assert table.service_by_vip(web.vip) is web and web.endpoints == ()


def test_table_snapshot_replaces_everything_and_moves_ids_between_services() -> None:
    table = RouteTable(VipAllocator("240.0.0.0/4"))
    table.upsert(ep("web", "x"))
    table.upsert(ep("db", "d1"))
    table.upsert(ep("api", "x"))  # the id now belongs to another service
    assert table.service("web").endpoints == ()  # type: ignore[union-attr]
    assert [e.id for e in table.service("api").endpoints] == ["x"]  # type: ignore[union-attr]
    table.replace_all([ep("web", "w1"), ep("cache", "c1")])
    assert {s.name: [e.id for e in s.endpoints] for s in table.services()} == {
        "api": [], "cache": ["c1"], "db": [], "web": ["w1"],
    }
    table.remove("x")  # gone with the snapshot: nothing to do
    assert table.version == 4


def test_the_agent_carries_registered_weights_into_the_table() -> None:
    table = RouteTable(VipAllocator("240.0.0.0/4"))
    instance = Instance(id="web-1", name="web", address="10.0.0.1", port=80, tags=("v1",),
                        node="h1", weight=7)
    apply_change(table, Change(1, "snapshot", (instance,)))
    service = table.service("web")
    assert service is not None
    assert service.endpoints == (Endpoint("web", "web-1", "10.0.0.1", 80, ("v1",), "h1", 7),)


def test_tcp_endpoints_leave_out_udp_ports_and_follow_every_change() -> None:
    table = RouteTable(VipAllocator("240.0.0.0/4"))
    tcp, udp = ep("dns", "dns-1"), Endpoint("dns", "dns-1-udp", "10.0.0.2", 53, tags=("udp",))
    table.replace_all([tcp, udp])
    service = table.service("dns")
    assert service is not None
    assert (service.endpoints, service.tcp_endpoints) == ((tcp, udp), (tcp,))
    other = ep("dns", "dns-2", "10.0.0.3")
    table.upsert(other)
    assert service.tcp_endpoints == (tcp, other)
    table.remove("dns-1")
    assert (service.endpoints, service.tcp_endpoints) == ((udp, other), (other,))  # by id
