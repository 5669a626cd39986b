"""What a federated job is: model, loss, data, default hyperparameters, runtimes.

A ``JobSpec`` is a frozen dataclass of plain values and factories, so a user adds
a job by writing one Python file that builds one (see docs/custom-job.md) and
Canopy never needs to change. Two kinds exist:

* network jobs (``model`` set): a ``torch.nn.Module`` returning class logits
  ``(B, num_classes)`` and a loss on them; they run eagerly under PyTorch and as
  an ExecuTorch training program on phones;
* closed-form jobs (``closed_form`` set): a model whose gradient is a numpy
  formula, such as hello-mobile. They have no ExecuTorch program (export returns
  ``None``), and every runtime trains them with the same numpy code.

A job also declares its ``task``, which fixes what its targets are and which
metrics every runtime and the server report for it (``TASK_METRICS``):

* ``classification`` (default): integer labels ``0 .. num_classes - 1``, one per
  example; the network returns logits ``(B, num_classes)``; metrics ``loss`` and
  ``accuracy``;
* ``regression``: ``float32`` targets of shape ``target_shape`` per example
  (``()`` for one value); the network returns ``(B, *target_shape)`` values and
  the job gives a regression loss (e.g. ``F.mse_loss``); metrics ``loss``,
  ``mse`` and ``mae``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from aggregation.tensors import TensorDict
from edge.data.config import DatasetConfig
from edge.data.dataset import Dataset
from edge.data.partition import PartitionScheme
from edge.jobs.hyperparams import (
    ALL_RUNTIMES,
    TASK_METRICS,
    RuntimeName,
    TaskKind,
    TrainHyperparams,
)
from infra.errors import ConfigError
from infra.keys import check_segment
from infra.store import ObjectStore

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelFactory = Callable[[], nn.Module]
ExampleBatchFn = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ClosedFormStep:
    """One batch of a closed-form model: mean loss, correct count, gradient per tensor."""

    loss: float
    correct: int
    gradient: TensorDict


class ClosedFormModel(Protocol):
    """A model trained by a numpy gradient formula instead of a network."""

    def initial_state(self, seed: int) -> TensorDict:
        """The model state before round 0."""
        ...

    def loss_and_gradient(self, state: TensorDict, x: np.ndarray, y: np.ndarray) -> ClosedFormStep:
        """Mean loss, correct count and gradient of the mean loss over the batch."""
        ...


class DatasetFactory(Protocol):
    """Builds a job's dataset from a config (a store is passed for S3 sources)."""

    def __call__(self, config: DatasetConfig, *, store: ObjectStore | None = None) -> Dataset: ...


def random_example_batch(
    input_shape: tuple[int, ...], num_classes: int, batch_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal features and uniform labels: enough to trace and to check parity."""
    rng = np.random.default_rng([seed, 0xBA7C])
    x = rng.standard_normal((batch_size, *input_shape), dtype=np.float32)
    y = rng.integers(0, num_classes, size=batch_size, dtype=np.int64)
    return x, y


def random_regression_batch(
    input_shape: tuple[int, ...], target_shape: tuple[int, ...], batch_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal features and ``float32`` targets, for regression jobs."""
    rng = np.random.default_rng([seed, 0xBA7C])
    x = rng.standard_normal((batch_size, *input_shape), dtype=np.float32)
    y = rng.standard_normal((batch_size, *target_shape), dtype=np.float32)
    return x, y


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """Everything Canopy needs to train one federated job on devices.

    Keyword-only, so a field added later never shifts a user's arguments.

    Attributes
    ----------
    name:
        Job name; also an S3 key segment, so letters, digits, '.', '_' and '-'.
    description:
        One line for listings.
    input_shape:
        Shape of one example, e.g. ``(3, 32, 32)``; device data is checked against it.
    num_classes:
        Classification: labels are ``0 .. num_classes - 1`` and the network returns
        ``(B, num_classes)`` logits. Regression jobs leave it at 0.
    task:
        ``classification`` or ``regression``; fixes the targets' dtype and shape
        and the metrics (``TASK_METRICS``) every runtime and the server report.
    target_shape:
        Regression: shape of one example's target (``()``: one value, so targets
        are ``(n,)``; ``(k,)``: k values). Classification: ``()`` (one label).
    dataset:
        Builds the job's dataset (train split for devices, test split held out).
    hyperparams:
        Default local training hyperparameters.
    model:
        Network jobs: builds the ``nn.Module`` (logits, or regression values, out).
        Parameters only, no buffers: an ExecuTorch training program cannot report
        buffer updates.
    loss:
        Network jobs: ``loss(outputs, targets) -> scalar`` (a batch mean); exported
        inside the program. The default, cross-entropy, suits classification only.
    closed_form:
        Closed-form jobs: the numpy model. Exactly one of ``model``/``closed_form``.
    runtimes:
        Runtimes devices may train this job on.
    example_batch:
        ``(batch_size, seed) -> (x, y)`` used to trace the export and feed the
        parity check; default: random features of ``input_shape``.
    default_dataset:
        The dataset config used when a run does not give one.
    partition:
        How the training split is divided among simulated devices by default.
    """

    name: str
    description: str
    input_shape: tuple[int, ...]
    num_classes: int = 0
    dataset: DatasetFactory
    hyperparams: TrainHyperparams
    task: TaskKind = "classification"
    target_shape: tuple[int, ...] = ()
    model: ModelFactory | None = None
    loss: LossFn = F.cross_entropy
    closed_form: ClosedFormModel | None = None
    runtimes: frozenset[RuntimeName] = ALL_RUNTIMES
    example_batch: ExampleBatchFn | None = None
    default_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionScheme = field(default_factory=PartitionScheme)

    def __post_init__(self) -> None:
        try:
            check_segment(self.name, "job name")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if (self.model is None) == (self.closed_form is None):
            raise ConfigError(
                f"job {self.name}: give exactly one of model= (a network) or closed_form= "
                "(a numpy model)"
            )
        if not self.runtimes or not self.runtimes <= ALL_RUNTIMES:
            raise ConfigError(
                f"job {self.name}: runtimes must be a non-empty subset of {sorted(ALL_RUNTIMES)}"
            )
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            raise ConfigError(f"job {self.name}: input_shape {self.input_shape} must be positive")
        self._check_task()

    def _check_task(self) -> None:
        if self.task not in TASK_METRICS:
            raise ConfigError(
                f"job {self.name}: task {self.task!r} is not one of {sorted(TASK_METRICS)}"
            )
        if any(d < 1 for d in self.target_shape):
            raise ConfigError(f"job {self.name}: target_shape {self.target_shape} must be positive")
        if self.task == "classification":
            if self.num_classes < 1:
                raise ConfigError(
                    f"job {self.name}: num_classes must be >= 1 for a classification job "
                    "(labels are 0 .. num_classes - 1); a regression job sets task='regression'"
                )
            if self.target_shape:
                raise ConfigError(
                    f"job {self.name}: target_shape applies to regression; a classification "
                    "job has one integer label per example (leave target_shape out)"
                )
            return
        if self.num_classes:
            raise ConfigError(
                f"job {self.name}: num_classes is for classification; a regression job "
                "leaves it out and gives target_shape instead"
            )
        if self.closed_form is not None:
            raise ConfigError(
                f"job {self.name}: closed-form models report accuracy (ClosedFormStep.correct); "
                "a regression job needs model= (a network)"
            )
        if self.loss is F.cross_entropy:
            raise ConfigError(
                f"job {self.name}: a regression job needs a regression loss, e.g. "
                "loss=torch.nn.functional.mse_loss (the default is cross-entropy)"
            )

    @property
    def has_program(self) -> bool:
        """Whether the job is exported as an ExecuTorch program (network jobs only)."""
        return self.model is not None

    @property
    def metric_names(self) -> tuple[str, ...]:
        """What devices and the server report for this job, ``loss`` first."""
        return TASK_METRICS[self.task]

    @property
    def target_dtype(self) -> type[np.integer] | type[np.floating]:
        """``int64`` labels (classification) or ``float32`` targets (regression)."""
        return np.int64 if self.task == "classification" else np.float32

    def make_example_batch(self, batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A batch of the right shapes and dtypes, from ``example_batch`` or the default."""
        if self.example_batch is not None:
            return self.example_batch(batch_size, seed)
        if self.task == "regression":
            return random_regression_batch(self.input_shape, self.target_shape, batch_size, seed)
        return random_example_batch(self.input_shape, self.num_classes, batch_size, seed)

    def build_model(self) -> nn.Module:
        """A fresh network (network jobs only)."""
        if self.model is None:
            raise ConfigError(f"job {self.name} is closed-form: it has no network to build")
        return self.model()
