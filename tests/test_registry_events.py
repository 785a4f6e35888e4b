"""Discoverd's subscription events, derived from registry changes (no I/O)."""

from __future__ import annotations

from consulate.control.registry.events import ServiceEvent, ServiceView, leader_of
from consulate.control.registry.model import Change, Instance


def web(n: int, created: int, port: int = 80, name: str = "web") -> Instance:
    return Instance(id=f"web-{n}", name=name, address=f"10.0.0.{n}", port=port,
                    create_index=created, modify_index=created)


def kinds(events: list[ServiceEvent]) -> list[tuple[str, str | None]]:
    return [(e.kind, e.instance.id if e.instance else None) for e in events]


def test_subscription_starts_with_the_set_then_current_then_the_leader() -> None:
    view = ServiceView("web")
    db = Instance(id="db-1", name="db", address="10.0.1.1", port=5432, create_index=1)
    events = view.apply(Change(5, "snapshot", (web(2, 3), db, web(1, 4))))
    assert kinds(events) == [("up", "web-2"), ("up", "web-1"), ("current", None),
                             ("leader", "web-2")]  # the oldest registration leads
    assert {e.index for e in events} == {5}


def test_heartbeat_or_same_registration_emits_nothing() -> None:
    view = ServiceView("web")
    view.apply(Change(5, "snapshot", (web(1, 4),)))
    assert view.apply(Change(6, "up", (web(1, 4),))) == []


def test_changed_attributes_are_an_update() -> None:
    view = ServiceView("web")
    view.apply(Change(5, "snapshot", (web(1, 4),)))
    assert kinds(view.apply(Change(6, "up", (web(1, 4, port=81),)))) == [("update", "web-1")]


def test_leader_moves_to_the_next_oldest_only_when_the_leader_leaves() -> None:
    view = ServiceView("web")
    view.apply(Change(5, "snapshot", (web(1, 2), web(2, 3))))
    assert kinds(view.apply(Change(6, "up", (web(3, 6),)))) == [("up", "web-3")]
    assert kinds(view.apply(Change(7, "down", (web(2, 3),)))) == [("down", "web-2")]
    assert kinds(view.apply(Change(8, "down", (web(1, 2),)))) == [("down", "web-1"),
                                                                  ("leader", "web-3")]
    assert kinds(view.apply(Change(9, "down", (web(3, 6),)))) == [("down", "web-3"),
                                                                  ("leader", None)]


def test_other_services_are_ignored_and_a_rename_is_a_down() -> None:
    view = ServiceView("web")
    view.apply(Change(5, "snapshot", (web(1, 2),)))
    assert view.apply(Change(6, "up", (web(9, 6, name="db"),))) == []
    assert kinds(view.apply(Change(7, "up", (web(1, 2, name="api"),)))) == [
        ("down", "web-1"), ("leader", None)]


def test_a_resync_snapshot_emits_only_the_difference() -> None:
    view = ServiceView("web")
    view.apply(Change(5, "snapshot", (web(1, 2), web(2, 3))))
    events = view.apply(Change(9, "snapshot", (web(2, 3), web(3, 8))))
    assert kinds(events) == [("down", "web-1"), ("up", "web-3"), ("leader", "web-2")]


def test_leader_of_breaks_ties_by_id() -> None:
    assert leader_of({}) is None
    tied = {i.id: i for i in (web(2, 5), web(1, 5))}
    assert leader_of(tied) == web(1, 5)
