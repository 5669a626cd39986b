"""Simulated device profiles: everything random follows from the seed, nothing from timing."""

from __future__ import annotations

from collections import Counter

import pytest

from edge.simulator import make_profiles, simulated_device_id


def test_same_seed_same_fleet_other_seed_other_fleet() -> None:
    first = make_profiles(7, 300, dropout=0.2, slow_fraction=0.3, offline_fraction=0.2)
    again = make_profiles(7, 300, dropout=0.2, slow_fraction=0.3, offline_fraction=0.2)
    other = make_profiles(8, 300, dropout=0.2, slow_fraction=0.3, offline_fraction=0.2)

    assert first == again
    assert [p.speed for p in first] != [p.speed for p in other]
    assert first[42].device_id == simulated_device_id(7, 42) == "sim-7-00042"


def test_a_bigger_fleet_extends_a_smaller_one() -> None:
    # Device i is the same phone whether 10 or 1,000 devices are simulated.
    assert make_profiles(3, 1000)[:10] == make_profiles(3, 10)


def test_fractions_are_respected_roughly() -> None:
    fleet = make_profiles(1, 4000, dropout=0.1, slow_fraction=0.25, offline_fraction=0.2)

    classes = Counter(p.speed_class for p in fleet)
    with_windows = sum(p.offline_rounds > 0 for p in fleet)
    mean_dropout = sum(p.dropout for p in fleet) / len(fleet)

    assert 0.22 < classes["slow"] / 4000 < 0.28
    assert all(p.speed >= 3.0 for p in fleet if p.speed_class == "slow")
    assert all(p.speed == 1.0 for p in fleet if p.speed_class == "fast")
    assert 0.17 < with_windows / 4000 < 0.23
    assert mean_dropout == pytest.approx(0.1, abs=0.005)


def test_dropouts_depend_on_device_and_round_not_on_call_order() -> None:
    fleet = make_profiles(5, 200, dropout=0.3)
    forward = {(p.device_id, r) for r in range(10) for p in fleet if p.drops_out(r)}
    backward = {
        (p.device_id, r) for r in reversed(range(10)) for p in reversed(fleet) if p.drops_out(r)
    }

    assert forward == backward
    assert 0.2 < len(forward) / 2000 < 0.4
    assert not any(p.drops_out(r) for p in make_profiles(5, 50, dropout=0.0) for r in range(20))


def test_availability_windows_repeat_with_their_period() -> None:
    windowed = make_profiles(2, 500, offline_fraction=1.0)

    for p in windowed:
        pattern = [p.online(r) for r in range(p.offline_period)]
        assert pattern.count(False) == p.offline_rounds
        assert 1 <= p.offline_rounds <= p.offline_period // 2
        assert [p.online(r + p.offline_period) for r in range(p.offline_period)] == pattern
    always = make_profiles(2, 100, offline_fraction=0.0)
    assert all(p.online(r) for p in always for r in range(30))


@pytest.mark.parametrize("field", ["dropout", "slow_fraction", "offline_fraction"])
def test_fractions_outside_unit_interval_are_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make_profiles(0, 3, **{field: 1.5})
