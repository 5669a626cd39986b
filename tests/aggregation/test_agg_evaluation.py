"""Federated evaluation's pure core: metric sums that add like partials, and a leaf's intake."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregation.evaluation import (
    ACCEPTED,
    DUPLICATE,
    EvaluationCollector,
    EvaluationSums,
    add_metric_sums,
)
from aggregation.partial import MetricSum
from infra.errors import ValidationError

reports = st.lists(
    st.tuples(
        st.integers(1, 10_000),
        st.floats(0, 1, allow_nan=False),
        st.floats(0, 50, allow_nan=False),
    ),
    min_size=1,
    max_size=12,
)


def sums_of(rows: list[tuple[int, float, float]]) -> list[EvaluationSums]:
    return [EvaluationSums.of_report(n, {"accuracy": acc, "loss": loss}) for n, acc, loss in rows]


@given(reports, reports, reports)
def test_sums_are_a_commutative_monoid(
    a: list[tuple[int, float, float]],
    b: list[tuple[int, float, float]],
    c: list[tuple[int, float, float]],
) -> None:
    x, y, z = (EvaluationSums.total(sums_of(rows)) for rows in (a, b, c))

    left, right = (x + y) + z, x + (y + z)
    assert (left.devices, left.samples) == (right.devices, right.samples)
    for name in ("accuracy", "loss"):
        assert left.metrics[name].total == pytest.approx(right.metrics[name].total)
        assert left.metrics[name].weight == right.metrics[name].weight
    assert (x + y).means() == pytest.approx((y + x).means())
    assert x + EvaluationSums.zero() == x == EvaluationSums.zero() + x


@given(reports)
def test_the_mean_weights_each_device_by_its_examples(rows: list[tuple[int, float, float]]) -> None:
    total = EvaluationSums.total(sums_of(rows))

    examples = sum(n for n, _, _ in rows)
    assert total.devices == len(rows) and total.samples == examples
    expected = sum(n * acc for n, acc, _ in rows) / examples
    assert total.means()["accuracy"] == pytest.approx(expected)


def test_three_examples_do_not_count_like_three_hundred() -> None:
    small = EvaluationSums.of_report(3, {"accuracy": 0.0})
    large = EvaluationSums.of_report(300, {"accuracy": 1.0})

    assert (small + large).means() == {"accuracy": pytest.approx(300 / 303)}
    assert EvaluationSums.zero().means() == {}


def test_sums_round_trip_through_json_and_refuse_nonsense() -> None:
    total = EvaluationSums.of_report(7, {"mse": 0.25, "mae": 0.5, "loss": 0.25})

    assert EvaluationSums.from_json(total.to_json()) == total
    assert total.metrics["mse"] == MetricSum(1.75, 7.0)
    with pytest.raises(ValidationError):
        EvaluationSums(devices=1, samples=0)
    with pytest.raises(ValidationError):
        EvaluationSums(devices=1, samples=3, metrics={"loss": MetricSum(math.nan, 3.0)})
    with pytest.raises(ValidationError):
        EvaluationSums.of_report(0, {"loss": 1.0})
    with pytest.raises(ValidationError):
        EvaluationSums.from_json({"devices": 1, "samples": 2, "metrics": {"loss": [1.0]}})


def test_add_metric_sums_adds_key_by_key() -> None:
    total = add_metric_sums({"a": MetricSum(1.0, 2.0)}, {"a": MetricSum(3.0, 4.0), "b": (1, 1)})  # type: ignore[dict-item]

    assert total == {"a": MetricSum(4.0, 6.0), "b": MetricSum(1.0, 1.0)}


def collector(**kw: object) -> EvaluationCollector:
    values: dict[str, object] = {
        "task_id": "t",
        "model_version": "m" * 64,
        "selected": frozenset({"a", "b", "c", "d"}),
        "metrics": ("loss", "accuracy"),
        "max_samples": 100,
    }
    values.update(kw)
    return EvaluationCollector(**values)  # type: ignore[arg-type]


def offer(c: EvaluationCollector, device: str, **kw: object) -> str:
    report: dict[str, object] = {
        "device_id": device,
        "task_id": "t",
        "model_version": "m" * 64,
        "num_samples": 10,
        "metrics": {"loss": 0.5, "accuracy": 0.75},
    }
    report.update(kw)
    return c.offer(**report)  # type: ignore[arg-type]


def test_a_leaf_counts_the_first_report_per_selected_device_and_refuses_the_rest() -> None:
    c = collector()

    outcomes = [
        offer(c, "a"),
        offer(c, "a", metrics={"loss": 9.0, "accuracy": 0.0}),  # a retry stored twice
        offer(c, "b", num_samples=30, metrics={"loss": 0.1, "accuracy": 1.0}),
        offer(c, "stranger"),
        offer(c, "c", task_id="t-old"),
        offer(c, "c", model_version="x" * 64),
        offer(c, "c", num_samples=101),
        offer(c, "c", num_samples=0),
        offer(c, "d", metrics={"loss": 0.5}),
        offer(c, "d", metrics={"loss": 0.5, "accuracy": 1.0, "f1": 1.0}),
        offer(c, "d", metrics={"loss": math.inf, "accuracy": 1.0}),
    ]

    assert outcomes == [
        ACCEPTED,
        DUPLICATE,
        ACCEPTED,
        "not-selected",
        "wrong-task",
        "stale-model",
        "weight-cap",
        "bad-weight",
        "bad-metric",
        "bad-metric",
        "bad-metric",
    ]
    assert c.reported == {"a", "b"} and c.duplicates == 1
    assert sum(c.rejected.values()) == 8 and set(c.rejection_examples) == set(c.rejected)
    result = c.result()
    assert (result.devices, result.samples) == (2, 40)
    assert result.means() == {
        "loss": pytest.approx((10 * 0.5 + 30 * 0.1) / 40),
        "accuracy": pytest.approx((10 * 0.75 + 30 * 1.0) / 40),
    }


def test_a_leaf_nobody_reported_to_sums_to_zero() -> None:
    assert collector().result() == EvaluationSums.zero()
