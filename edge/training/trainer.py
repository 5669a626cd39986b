"""The device trainer contract: one interface, two runtimes.

A device gets the round's model (``RoundModel``: the global state, plus the
``.pte`` program for ExecuTorch), its local data and hyperparameters, and
returns a ``TrainResult``. The update follows Canopy's sign convention
(docs/architecture.md): **new minus old**, the locally trained parameters minus
the round's global parameters, as ``float32`` numpy arrays under the model's
``state_dict`` names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from aggregation.tensors import TensorDict
from edge.jobs.spec import JobSpec, RuntimeName, TrainHyperparams
from edge.training.errors import TrainingError
from infra.errors import ConfigError, ValidationError


@dataclass(frozen=True)
class RoundModel:
    """What a device downloads for a round.

    ``state`` is the round's global model (updates are computed against it);
    ``program`` is its ExecuTorch training program, needed by the ExecuTorch
    runtime for network jobs and ignored otherwise; ``program_sha256`` is the
    program's hash from the task manifest. Devices should always pass it: the
    ExecuTorch runtime can crash on corrupted programs, and the hash is the check
    that catches every corruption before the runtime sees the bytes.
    """

    state: TensorDict
    program: bytes | None = None
    program_sha256: str | None = None


@dataclass(frozen=True)
class TrainResult:
    """What a device reports after local training.

    Attributes
    ----------
    update:
        ``new - old`` per tensor, ``float32``.
    num_samples:
        Local training examples (the partition size, not examples x epochs);
        the aggregation weight.
    metrics:
        ``loss``: mean training loss over the steps; ``accuracy``: fraction of
        correct predictions over all training examples seen (before each step).
    steps:
        Optimizer steps taken.
    runtime:
        Which runtime trained.
    """

    update: TensorDict
    num_samples: int
    metrics: dict[str, float]
    steps: int
    runtime: RuntimeName
    seconds: float = field(default=0.0, compare=False)


class DeviceTrainer(Protocol):
    """Trains one device's local data, starting from the round's model."""

    runtime: RuntimeName

    def train(
        self,
        job: JobSpec,
        model: RoundModel,
        x: np.ndarray,
        y: np.ndarray,
        hyperparams: TrainHyperparams,
        *,
        seed: int = 0,
    ) -> TrainResult:
        """Run local SGD; ``seed`` fixes the batch order."""
        ...


def check_local_data(job: JobSpec, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a device's data against the job; returns ``float32`` x and ``int64`` y."""
    x = np.asarray(x)
    y = np.asarray(y)
    expected = ("n", *job.input_shape)
    if x.ndim != len(expected) or tuple(x.shape[1:]) != job.input_shape:
        raise ValidationError(
            f"job {job.name}: local features have shape {tuple(x.shape)}, expected {expected}"
        )
    if y.shape != (x.shape[0],):
        raise ValidationError(
            f"job {job.name}: labels have shape {tuple(y.shape)}, expected ({x.shape[0]},)"
        )
    if x.shape[0] == 0:
        raise ValidationError(f"job {job.name}: the device has no local data (empty partition)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValidationError(f"job {job.name}: labels must be integers, got {y.dtype}")
    if y.min() < 0 or y.max() >= job.num_classes:
        raise ValidationError(
            f"job {job.name}: labels must lie in 0..{job.num_classes - 1}, "
            f"got {int(y.min())}..{int(y.max())}"
        )
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x32).all():
        raise ValidationError(f"job {job.name}: local features contain NaN or infinity")
    return x32, y.astype(np.int64, copy=False)


def check_runtime(job: JobSpec, runtime: RuntimeName) -> None:
    if runtime not in job.runtimes:
        raise ConfigError(
            f"job {job.name} does not run on {runtime}; it supports {sorted(job.runtimes)}"
        )


class MetricsAccumulator:
    """Mean loss over steps and accuracy over examples, checking every loss is finite."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.steps = 0
        self.correct = 0
        self.seen = 0

    def add(self, loss: float, correct: int, batch: int) -> None:
        if not math.isfinite(loss):
            raise TrainingError(
                f"training loss became {loss} at step {self.steps + 1}; the update is unusable "
                "(lower the learning rate?)"
            )
        self.loss_sum += loss
        self.steps += 1
        self.correct += correct
        self.seen += batch

    def metrics(self) -> dict[str, float]:
        return {
            "loss": self.loss_sum / max(self.steps, 1),
            "accuracy": self.correct / max(self.seen, 1),
        }


def update_from(new: TensorDict, old: TensorDict) -> TensorDict:
    """``new - old`` per tensor as ``float32``, refusing non-finite results."""
    if new.keys() != old.keys():
        raise TrainingError(
            f"trained tensors {sorted(new)} do not match the global model's {sorted(old)}"
        )
    update = {name: (new[name] - old[name]).astype(np.float32, copy=False) for name in old}
    bad = [name for name, arr in update.items() if not np.isfinite(arr).all()]
    if bad:
        raise TrainingError(f"update has non-finite values in {bad}; it is not reported")
    return update
