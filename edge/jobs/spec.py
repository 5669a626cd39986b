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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from aggregation.tensors import TensorDict
from edge.data.config import DatasetConfig
from edge.data.dataset import Dataset
from edge.data.partition import PartitionScheme
from infra.errors import ConfigError
from infra.keys import check_segment
from infra.store import ObjectStore

RuntimeName = Literal["executorch", "pytorch"]
ALL_RUNTIMES: frozenset[RuntimeName] = frozenset({"executorch", "pytorch"})

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelFactory = Callable[[], nn.Module]
ExampleBatchFn = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


class TrainHyperparams(BaseModel):
    """Local training hyperparameters a round sends to its devices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    local_epochs: int = Field(default=1, ge=1, le=1000, description="Passes over local data.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Stop after this many optimizer steps even if epochs remain (None: no cap).",
    )
    batch_size: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Examples per step. ExecuTorch programs are exported for one batch size.",
    )
    lr: float = Field(default=0.05, gt=0, le=10, allow_inf_nan=False, description="SGD step size.")
    momentum: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="SGD momentum; the buffer carries across every batch of the local training.",
    )


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


@dataclass(frozen=True)
class JobSpec:
    """Everything Canopy needs to train one federated job on devices.

    Attributes
    ----------
    name:
        Job name; also an S3 key segment, so letters, digits, '.', '_' and '-'.
    description:
        One line for listings.
    input_shape:
        Shape of one example, e.g. ``(3, 32, 32)``; device data is checked against it.
    num_classes:
        Labels are ``0 .. num_classes - 1``.
    dataset:
        Builds the job's dataset (train split for devices, test split held out).
    hyperparams:
        Default local training hyperparameters.
    model:
        Network jobs: builds the ``nn.Module`` (logits out). Parameters only, no
        buffers: an ExecuTorch training program cannot report buffer updates.
    loss:
        Network jobs: ``loss(logits, labels) -> scalar``; exported inside the program.
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
    num_classes: int
    dataset: DatasetFactory
    hyperparams: TrainHyperparams
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
        if self.num_classes < 1:
            raise ConfigError(f"job {self.name}: num_classes must be >= 1")

    @property
    def has_program(self) -> bool:
        """Whether the job is exported as an ExecuTorch program (network jobs only)."""
        return self.model is not None

    def make_example_batch(self, batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A batch of the right shapes and dtypes, from ``example_batch`` or the default."""
        if self.example_batch is not None:
            return self.example_batch(batch_size, seed)
        return random_example_batch(self.input_shape, self.num_classes, batch_size, seed)

    def build_model(self) -> nn.Module:
        """A fresh network (network jobs only)."""
        if self.model is None:
            raise ConfigError(f"job {self.name} is closed-form: it has no network to build")
        return self.model()
