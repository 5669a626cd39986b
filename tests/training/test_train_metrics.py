"""Job-declared metrics: one pure, summable definition used by every runtime and the server."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from aggregation.partial import MetricSum
from edge.data import DatasetConfig, PartitionScheme
from edge.data.dataset import Dataset
from edge.jobs import JobSpec, TrainHyperparams
from edge.training import (
    ExecuTorchTrainer,
    PyTorchTrainer,
    RoundModel,
    check_parity,
    evaluate,
    evaluate_sums,
    export_job_program,
    initial_state,
)
from edge.training.metrics import add_sums, correct_sums, loss_sums, means, output_sums
from infra.errors import ValidationError
from infra.store import ObjectStore

# ---------------------------------------------------------------- the pure module


def test_classification_counts_predictions_equal_to_the_labels() -> None:
    sums = output_sums("classification", np.array([0, 2, 1, 1]), np.array([0, 1, 1, 1]))
    assert sums == {"accuracy": MetricSum(3.0, 4.0)}
    assert means(add_sums(loss_sums(0.7, 1.0), sums)) == {"loss": 0.7, "accuracy": 0.75}


def test_regression_errors_count_every_target_value_once() -> None:
    outputs = np.array([[1.0, 2.0], [0.0, -1.0]], dtype=np.float32)
    targets = np.array([[1.0, 0.0], [3.0, -1.0]], dtype=np.float32)

    sums = output_sums("regression", outputs, targets)

    assert sums == {"mse": MetricSum(4.0 + 9.0, 4.0), "mae": MetricSum(2.0 + 3.0, 4.0)}
    assert means(sums) == {"mse": 13 / 4, "mae": 5 / 4}
    scalar = output_sums("regression", np.array([0.5, 1.0]), np.array([0.0, 0.0]))
    assert means(scalar) == {"mse": (0.25 + 1.0) / 2, "mae": 0.75}


def test_loss_weight_is_per_step_for_training_and_per_example_for_evaluation() -> None:
    steps = add_sums(loss_sums(1.0, 1.0), loss_sums(3.0, 1.0))
    examples = add_sums(loss_sums(1.0, 4.0), loss_sums(3.0, 2.0))
    assert means(steps) == {"loss": 2.0}
    assert means(examples) == {"loss": (4.0 + 6.0) / 6}


@settings(max_examples=40, deadline=None)
@given(
    task=st.sampled_from(["classification", "regression"]),
    cuts=st.lists(st.integers(1, 59), max_size=5),
    seed=st.integers(0, 1000),
)
def test_sums_of_parts_divide_once_to_the_metrics_of_the_whole(
    task: str, cuts: list[int], seed: int
) -> None:
    """Devices (or batches) add their sums; the mean is taken once, at the end."""
    rng = np.random.default_rng(seed)
    if task == "classification":
        outputs, targets = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    else:
        outputs, targets = rng.normal(size=(60, 2)), rng.normal(size=(60, 2))
    bounds = [0, *sorted(set(cuts)), 60]

    parts = [
        output_sums(task, outputs[a:b], targets[a:b])  # type: ignore[arg-type]
        for a, b in itertools.pairwise(bounds)
    ]
    whole = output_sums(task, outputs, targets)  # type: ignore[arg-type]

    summed = add_sums(*parts)
    assert summed.keys() == whole.keys()
    for name in whole:
        assert summed[name].weight == whole[name].weight
        assert summed[name].total == pytest.approx(whole[name].total, rel=1e-12, abs=1e-12)


def test_outputs_of_the_wrong_shape_and_empty_metrics_are_refused() -> None:
    with pytest.raises(
        ValidationError, match=r"outputs have shape \(4, 1\) but the targets \(4,\)"
    ):
        output_sums("regression", np.zeros((4, 1)), np.zeros(4))
    with pytest.raises(ValidationError, match="no weight"):
        means({"accuracy": correct_sums(0, 0)["accuracy"]})


# ---------------------------------------------------------------- a regression job

WEIGHTS = np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]], dtype=np.float32)  # 3 inputs -> 2


def _line_data(config: DatasetConfig, *, store: ObjectStore | None = None) -> Dataset:
    del store
    rng = np.random.default_rng(config.seed)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, 3)).astype(np.float32)
        return x, (x @ WEIGHTS + 0.05 * rng.normal(size=(n, 2))).astype(np.float32)

    (x, y), (xt, yt) = draw(128), draw(64)
    return Dataset("lines", True, x, y, xt, yt, num_classes=0)


LINES = JobSpec(
    name="lines-mobile",
    description="Two linear targets from three features.",
    input_shape=(3,),
    task="regression",
    target_shape=(2,),
    dataset=_line_data,
    model=lambda: nn.Linear(3, 2),
    loss=F.mse_loss,
    hyperparams=TrainHyperparams(local_epochs=2, batch_size=8, lr=0.05, momentum=0.9),
    partition=PartitionScheme(kind="iid"),
)


def test_a_regression_job_reports_mse_and_mae_identically_on_both_runtimes() -> None:
    state = initial_state(LINES, 0)
    exported = export_job_program(LINES, state)
    assert exported is not None
    assert exported.info.input_dtypes == ["float32", "float32"]
    x, y = LINES.dataset(DatasetConfig()).split_arrays("train")

    et = ExecuTorchTrainer().train(LINES, RoundModel(state, exported.pte), x, y, LINES.hyperparams)
    pt = PyTorchTrainer().train(LINES, RoundModel(state), x, y, LINES.hyperparams)

    assert LINES.metric_names == ("loss", "mse", "mae")
    assert list(et.metrics) == list(pt.metrics) == ["loss", "mse", "mae"]
    assert et.steps == pt.steps == 32
    for name in LINES.metric_names:
        assert et.metrics[name] == pytest.approx(pt.metrics[name], rel=1e-5)
    for name in state:
        np.testing.assert_allclose(et.update[name], pt.update[name], atol=1e-5)
    # mse_loss is the mean squared error per value, so the two agree
    assert pt.metrics["loss"] == pytest.approx(pt.metrics["mse"], rel=1e-5)
    report = check_parity(LINES, state=state, program=exported.pte)
    assert report.passed and report.max_abs_diff < 1e-5, report


def test_evaluation_of_a_regression_job_matches_numpy_and_falls_with_training() -> None:
    state = initial_state(LINES, 0)
    data = LINES.dataset(DatasetConfig())
    x, y = data.split_arrays("train")
    xt, yt = data.split_arrays("test")
    hp = LINES.hyperparams.model_copy(update={"local_epochs": 10})

    before = evaluate(LINES, state, xt, yt, batch_size=10)
    result = PyTorchTrainer().train(LINES, RoundModel(state), x, y, hp)
    trained = {k: state[k] + result.update[k] for k in state}
    after = evaluate(LINES, trained, xt, yt, batch_size=10)

    error = xt @ state["weight"].T + state["bias"] - yt
    assert before["mse"] == pytest.approx(float(np.mean(error**2)), rel=1e-5)
    assert before["mae"] == pytest.approx(float(np.mean(np.abs(error))), rel=1e-5)
    assert before["loss"] == pytest.approx(before["mse"], rel=1e-5)
    assert after["mse"] < 0.1 * before["mse"], (before, after)
    halves = add_sums(
        evaluate_sums(LINES, trained, xt[:30], yt[:30]),
        evaluate_sums(LINES, trained, xt[30:], yt[30:]),
    )
    assert means(halves) == pytest.approx(after, rel=1e-6)
