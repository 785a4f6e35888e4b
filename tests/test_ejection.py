"""Outlier detection (proxy/outlier.py) with an injected clock: when endpoints leave
the pool, for how long, and how much of a pool may be out. End to end, over both
relays: tests/test_balance_mesh.py."""

from __future__ import annotations

import pytest

from consulate.proxy.outlier import Ejection, OutlierDetector, OutlierPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POOL = ("a", "b", "c", "d")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def detector(clock: Clock) -> OutlierDetector[str]:
    return OutlierDetector(OutlierPolicy(), clock)


def fail(detector: OutlierDetector[str], key: str, times: int,
         pool: tuple[str, ...] = POOL) -> list[Ejection[str] | None]:
    return [detector.failed(key, pool) for _ in range(times)]


def test_five_consecutive_failures_eject_for_30_seconds(
        detector: OutlierDetector[str], clock: Clock) -> None:
    assert fail(detector, "a", 4) == [None] * 4
    assert detector.failed("a", POOL) == Ejection("a", failures=5, ejections=1, seconds=30.0)
    assert detector.ejected == {"a"}
    assert detector.next_return() == 1030.0
    clock.now = 1029.999
    assert detector.release_due() == []
    clock.now = 1030.0
    assert detector.release_due() == ["a"]
    assert detector.ejected == frozenset()
    assert detector.next_return() is None


def test_a_success_resets_the_count(detector: OutlierDetector[str]) -> None:
    fail(detector, "a", 4)
    detector.succeeded("a")
    assert fail(detector, "a", 4) == [None] * 4
    assert detector.failed("a", POOL) is not None


def test_failures_while_ejected_change_nothing(
        detector: OutlierDetector[str], clock: Clock) -> None:
    fail(detector, "a", 5)
    assert fail(detector, "a", 20) == [None] * 20  # connects begun before the ejection
    assert detector.next_return() == 1030.0
    clock.now = 1030.0
    assert detector.release_due() == ["a"]
    assert fail(detector, "a", 4) == [None] * 4  # counting starts again from zero


def test_repeated_ejections_last_longer_up_to_300_seconds(
        detector: OutlierDetector[str], clock: Clock) -> None:
    times = []
    for _ in range(12):
        ejection = fail(detector, "a", 5)[-1]
        assert ejection is not None
        times.append(ejection.seconds)
        clock.now += ejection.seconds
        assert detector.release_due() == ["a"]
    assert times == [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]


def test_each_base_time_back_in_the_pool_forgives_one_ejection(
        detector: OutlierDetector[str], clock: Clock) -> None:
    for _ in range(3):
        fail(detector, "a", 5)
        clock.now += 300
        detector.release_due()  # ejections: 1, 2, 3
    clock.now += 59.9  # one base time behaved: 3 - 1, then this one: 3
    assert fail(detector, "a", 5)[-1] == Ejection("a", 5, 3, 90.0)
    clock.now += 90
    detector.release_due()
    clock.now += 120  # four base times: back to none, then this one
    assert fail(detector, "a", 5)[-1] == Ejection("a", 5, 1, 30.0)


@pytest.mark.parametrize(("pool", "ejectable"), [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2)])
def test_never_more_than_half_of_a_pool(
        detector: OutlierDetector[str], pool: int, ejectable: int) -> None:
    members = tuple("abcde"[:pool])
    ejected = [m for m in members if fail(detector, m, 5, members)[-1] is not None]
    assert ejected == list(members[:ejectable])
    assert detector.ejected_in(members) == ejectable


def test_an_endpoint_held_back_by_the_cap_is_ejected_once_there_is_room(
        detector: OutlierDetector[str], clock: Clock) -> None:
    pool = ("a", "b")
    fail(detector, "a", 5, pool)
    assert fail(detector, "b", 7, pool) == [None] * 7  # a is out: b must stay
    clock.now += 30
    assert detector.release_due() == ["a"]
    assert detector.failed("b", pool) == Ejection("b", failures=8, ejections=1, seconds=30.0)


def test_an_endpoint_outside_the_pool_is_not_ejected(detector: OutlierDetector[str]) -> None:
    assert fail(detector, "gone", 6) == [None] * 6


def test_forget_drops_endpoints_that_left(detector: OutlierDetector[str]) -> None:
    fail(detector, "a", 5)
    fail(detector, "b", 4)
    detector.forget({"b", "c"})
    assert detector.ejected == frozenset()
    assert detector.next_return() is None
    assert detector.failed("b", POOL) is not None  # b's count was kept


def test_the_base_ejection_time_is_configurable(clock: Clock) -> None:
    fast = OutlierDetector[str](OutlierPolicy(base_ejection_time=1.5), clock)
    assert fail(fast, "a", 5)[-1] == Ejection("a", 5, 1, 1.5)
    clock.now += 1.5
    assert fast.release_due() == ["a"]
    assert fail(fast, "a", 5)[-1] == Ejection("a", 5, 2, 3.0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"consecutive_failures": 0}, "consecutive_failures=0: give 1 or more"),
    ({"base_ejection_time": 0}, "base_ejection_time=0: give seconds > 0"),
    ({"max_ejection_percent": 101}, "max_ejection_percent=101: give 0 to 100"),
])
def test_bad_policies_are_refused_with_the_fix(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OutlierPolicy(**kwargs)  # type: ignore[arg-type]
