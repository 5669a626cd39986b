"""The one device loop: whatever the runtime's step, validation, batches, metrics and
the update are the loop's, done the same way."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from aggregation.partial import MetricSum
from aggregation.tensors import TensorDict
from edge.data.synthetic import XOR_LABELS, XOR_POINTS
from edge.jobs import JobSpec, TrainHyperparams, get_job
from edge.training import RoundModel, train_locally
from edge.training.batching import batch_plan
from edge.training.errors import TrainingError
from edge.training.metrics import MetricSums
from infra.errors import ConfigError, ValidationError


class RecordingStep:
    """A fake runtime: adds 1 to every weight per step and predicts class 0."""

    built: ClassVar[list[RecordingStep]] = []  # every step the loop built, newest last

    def __init__(self, job: JobSpec, model: RoundModel, hyperparams: TrainHyperparams) -> None:
        self.weights_now = {k: v.copy() for k, v in model.state.items()}
        self.losses = iter([0.5, 1.5, 2.5, float("nan")])
        self.seen: list[np.ndarray] = []
        RecordingStep.built.append(self)

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, MetricSums]:
        self.seen.append(x.copy())
        for name in self.weights_now:
            self.weights_now[name] += 1.0
        correct = int(np.count_nonzero(y == 0))
        return next(self.losses), {"accuracy": MetricSum(float(correct), float(y.shape[0]))}

    def weights(self) -> TensorDict:
        return {k: v.copy() for k, v in self.weights_now.items()}


def test_the_loop_runs_any_step_on_the_seeded_plan_and_reports_new_minus_old(
    xor: JobSpec, xor_state: TensorDict
) -> None:
    x, y = np.tile(XOR_POINTS, (2, 1)), np.tile(XOR_LABELS, 2)  # 8 examples
    hp = TrainHyperparams(batch_size=4, local_epochs=3, max_steps=3)

    result = train_locally(
        xor, RoundModel(xor_state), x, y, hp, RecordingStep, runtime="pytorch", seed=9
    )

    plan = batch_plan(8, 4, local_epochs=3, max_steps=3, seed=9)
    step = RecordingStep.built[-1]
    assert [s.tolist() for s in step.seen] == [x[idx].tolist() for idx in plan]
    assert (result.steps, result.num_samples, result.runtime) == (3, 8, "pytorch")
    for name, arr in xor_state.items():
        np.testing.assert_allclose(result.update[name], np.full_like(arr, 3.0), atol=1e-6)
        assert result.update[name].dtype == np.float32
    correct = sum(int(np.count_nonzero(y[idx] == 0)) for idx in plan)
    assert result.metrics == {"loss": (0.5 + 1.5 + 2.5) / 3, "accuracy": correct / 12}
    assert result.sums == {"loss": (4.5, 3.0), "accuracy": (float(correct), 12.0)}


def test_a_non_finite_loss_stops_the_loop_at_its_step(xor: JobSpec, xor_state: TensorDict) -> None:
    x, y = np.tile(XOR_POINTS, (4, 1)), np.tile(XOR_LABELS, 4)
    with pytest.raises(TrainingError, match="training loss became nan at step 4"):
        train_locally(
            xor,
            RoundModel(xor_state),
            x,
            y,
            TrainHyperparams(batch_size=4),
            RecordingStep,
            runtime="pytorch",
        )


def _never(job: JobSpec, model: RoundModel, hyperparams: TrainHyperparams) -> RecordingStep:
    raise AssertionError("the runtime's step must not be built")


def test_runtime_and_data_are_checked_before_the_step_is_built(
    xor: JobSpec, xor_state: TensorDict
) -> None:
    pytorch_only = JobSpec(**{**xor.__dict__, "name": "xor-pt", "runtimes": frozenset({"pytorch"})})
    hp = TrainHyperparams(batch_size=4)
    with pytest.raises(ConfigError, match="does not run on executorch"):
        train_locally(
            pytorch_only,
            RoundModel(xor_state),
            XOR_POINTS,
            XOR_LABELS,
            hp,
            _never,
            runtime="executorch",
        )
    with pytest.raises(ValidationError, match="empty partition"):
        train_locally(
            xor,
            RoundModel(xor_state),
            XOR_POINTS[:0],
            XOR_LABELS[:0],
            hp,
            _never,
            runtime="pytorch",
        )


def test_closed_form_jobs_use_the_numpy_step_on_every_runtime() -> None:
    hello = get_job("hello-mobile")
    x = np.ones((8, 256), dtype=np.float32)
    hp = TrainHyperparams(batch_size=8, max_steps=1, lr=0.5)
    state = {"vector": np.zeros(256, dtype=np.float32)}

    results = [
        train_locally(hello, RoundModel(state), x, np.zeros(8, int), hp, _never, runtime=r)
        for r in ("executorch", "pytorch")
    ]

    for result in results:
        np.testing.assert_allclose(result.update["vector"], np.full(256, 0.5), atol=1e-7)
    assert results[0].update["vector"].tobytes() == results[1].update["vector"].tobytes()
    assert results[0].metrics == results[1].metrics
