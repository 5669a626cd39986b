"""Accumulator: in-place sums that equal the pure ``+`` path, whatever the blocking."""

from __future__ import annotations

import numpy as np
import pytest

from aggregation.accumulator import Accumulator, sum_partials
from aggregation.partial import InconsistentPartials, PartialAggregate
from aggregation.tensors import TensorDict, TensorSpec, spec_of
from infra.errors import ConfigError, ValidationError

SHAPES = {"big": (50, 7), "small_a": (3,), "small_b": (2, 2), "mid": (40,)}


def updates(n: int, seed: int = 0) -> list[tuple[TensorDict, float]]:
    rng = np.random.default_rng(seed)
    return [
        (
            {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()},
            float(rng.integers(1, 50)),
        )
        for _ in range(n)
    ]


def exact_sum(items: list[tuple[TensorDict, float]]) -> dict[str, np.ndarray]:
    """Independent float64 reference: sum of weight * update, straight numpy."""
    return {k: np.sum([w * u[k].astype(np.float64) for u, w in items], axis=0) for k in SHAPES}


def magnitude(items: list[tuple[TensorDict, float]]) -> dict[str, np.ndarray]:
    """Sum of |weight * update|: the scale float32 staging error is relative to."""
    return {
        k: np.sum([w * np.abs(u[k].astype(np.float64)) for u, w in items], axis=0) for k in SHAPES
    }


@pytest.mark.parametrize("block_elems", [1, 7, 16, 64, 1 << 17])
@pytest.mark.parametrize("flush_every", [1, 3, 16])
def test_matches_reference_for_any_blocking(block_elems: int, flush_every: int) -> None:
    # Prepare
    items = updates(20)
    acc = Accumulator(spec_of(items[0][0]), flush_every=flush_every, block_elems=block_elems)

    # Execute
    for update, weight in items:
        acc.add(update, weight=weight, metrics={"loss": weight / 100})
    partial = acc.result()

    # Assert
    assert partial.count == 20
    assert partial.weight == sum(w for _, w in items)
    reference, scale = exact_sum(items), magnitude(items)
    for name in SHAPES:
        assert partial.sums[name].dtype == np.float64
        assert np.all(np.abs(partial.sums[name] - reference[name]) <= 1e-6 * scale[name])
    expected_loss = sum(w * w / 100 for _, w in items) / sum(w for _, w in items)
    assert partial.finalize()[1]["loss"] == pytest.approx(expected_loss, rel=1e-12)


def test_equals_pure_partial_sum_within_staging_error() -> None:
    items = updates(5, seed=1)
    acc = Accumulator(spec_of(items[0][0]))
    pure = PartialAggregate.zero()
    for update, weight in items:
        acc.add(update, weight=weight)
        pure = pure + PartialAggregate.from_update(update, weight=weight)

    got = acc.result()

    assert got.spec == pure.spec and got.count == pure.count and got.weight == pure.weight
    for name in SHAPES:
        np.testing.assert_allclose(got.sums[name], pure.sums[name], rtol=1e-5, atol=1e-5)


def test_scale_shrinks_tensors_but_not_weight() -> None:
    (update, _), *_ = updates(1)
    acc = Accumulator(spec_of(update))

    acc.add(update, weight=4, metrics={"loss": 1.0}, scale=0.25)
    partial = acc.result()

    assert partial.weight == 4.0
    np.testing.assert_allclose(partial.sums["mid"], update["mid"], rtol=1e-6)
    assert partial.metrics["loss"].total == 4.0


def test_float64_and_int_tensors_are_staged_exactly() -> None:
    update = {"x": np.array([1e-12, 1.0 + 2**-40]), "n": np.array([2**40], np.int64)}
    acc = Accumulator(spec_of(update))

    acc.add(update, weight=3)
    partial = acc.result()

    np.testing.assert_array_equal(partial.sums["x"], update["x"] * 3)
    np.testing.assert_array_equal(partial.sums["n"], [3.0 * 2**40])


def test_refused_update_leaves_the_sum_untouched() -> None:
    # Prepare
    (good, _), (other, _) = updates(2)
    acc = Accumulator(spec_of(good))
    acc.add(good, weight=2)
    wrong_shape = {**other, "mid": np.zeros(41, np.float32)}
    wrong_dtype = {**other, "mid": other["mid"].astype(np.float64)}
    missing = {k: v for k, v in other.items() if k != "mid"}

    # Execute / Assert
    with pytest.raises(InconsistentPartials, match="'mid' is"):
        acc.add(wrong_shape, weight=1)
    with pytest.raises(InconsistentPartials, match="float64"):
        acc.add(wrong_dtype, weight=1)
    with pytest.raises(InconsistentPartials, match=r"missing: \['mid'\]"):
        acc.add(missing, weight=1)
    with pytest.raises(ValidationError, match="weight"):
        acc.add(other, weight=0)
    with pytest.raises(ValidationError, match="scale must be in"):
        acc.add(other, weight=1, scale=2.0)
    partial = acc.result()
    assert partial == PartialAggregate.from_update(good, weight=2)  # x2 is exact in float32


def test_add_partial_and_updates_mix() -> None:
    items = updates(4, seed=2)
    child = PartialAggregate.from_update(items[0][0], weight=items[0][1])
    child = child + PartialAggregate.from_update(items[1][0], weight=items[1][1])
    acc = Accumulator(spec_of(items[0][0]))

    acc.add(items[2][0], weight=items[2][1])
    acc.add_partial(child)
    acc.add_partial(PartialAggregate.zero())
    acc.add(items[3][0], weight=items[3][1])
    partial = acc.result()

    assert partial.count == 4
    reference, scale = exact_sum(items), magnitude(items)
    for name in SHAPES:
        assert np.all(np.abs(partial.sums[name] - reference[name]) <= 1e-6 * scale[name])


def test_add_partial_of_another_model_is_refused() -> None:
    acc = Accumulator({"w": TensorSpec((2,), "float32")})
    stray = PartialAggregate.from_update({"w": np.zeros(3, np.float32)}, weight=1)

    with pytest.raises(InconsistentPartials, match="cannot add partial to the accumulator"):
        acc.add_partial(stray)


def test_result_hands_over_and_restarts_from_zero() -> None:
    (update, weight), (second, weight2) = updates(2)
    acc = Accumulator(spec_of(update))
    acc.add(update, weight=weight)

    first = acc.result()
    empty = acc.result()
    acc.add(second, weight=weight2)
    again = acc.result()

    assert first.count == 1 and empty.is_zero and again.count == 1
    for got, (u, w) in ((first, (update, weight)), (again, (second, weight2))):
        # a single weighted product is rounded once to float32 in the stage
        for name in SHAPES:
            np.testing.assert_allclose(got.sums[name], w * u[name].astype(np.float64), rtol=1e-7)


def test_sum_partials_skips_zeros_and_matches_reduce() -> None:
    items = updates(6, seed=3)
    parts = [PartialAggregate.from_update(u, weight=w) for u, w in items]
    parts.insert(2, PartialAggregate.zero())

    total = sum_partials(parts)
    reduced = PartialAggregate.zero()
    for part in parts:
        reduced = reduced + part

    assert total.count == reduced.count and total.weight == reduced.weight
    for name in SHAPES:
        np.testing.assert_allclose(total.sums[name], reduced.sums[name], rtol=1e-13, atol=1e-13)
    assert sum_partials([]).is_zero


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"flush_every": 0}, "flush_every"), ({"block_elems": 0}, "block_elems")],
)
def test_bad_configuration_is_a_config_error(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Accumulator({"w": TensorSpec((2,), "float32")}, **kwargs)


def test_empty_or_unsummable_spec_is_refused() -> None:
    with pytest.raises(ConfigError, match="non-empty"):
        Accumulator({})
    with pytest.raises(ConfigError, match="cannot be summed"):
        Accumulator({"flag": TensorSpec((2,), "bool")})


def test_flush_every_one_is_float64_throughout() -> None:
    # Prepare: weights that are not powers of two, so float32 products would round
    items = updates(3, seed=4)
    acc = Accumulator(spec_of(items[0][0]), flush_every=1, block_elems=16)
    pure = PartialAggregate.zero()

    # Execute
    for update, weight in items:
        acc.add(update, weight=weight + 0.1)
        pure = pure + PartialAggregate.from_update(update, weight=weight + 0.1)

    # Assert: same float64 operations in the same order, so bit-identical
    assert acc.result() == pure
