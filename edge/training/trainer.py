"""The device trainer contract: one interface, two runtimes, one loop.

A device gets the round's model (``RoundModel``: the global state, plus the
``.pte`` program for ExecuTorch), its local data and hyperparameters, and
returns a ``TrainResult``. The update follows Canopy's sign convention
(docs/architecture.md): **new minus old**, the locally trained parameters minus
the round's global parameters, as ``float32`` numpy arrays under the model's
``state_dict`` names.

Runtimes differ only in how they take one SGD step, so each provides a
``LocalStep``; ``edge.training.loop`` holds the ``DeviceTrainer`` and the one
loop (``train_locally``: validation, batch plan, metrics, the update) that runs
any runtime's step the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from aggregation.partial import MetricSum
from aggregation.tensors import TensorDict
from edge.jobs.spec import JobSpec, RuntimeName, TrainHyperparams


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
        The job's metrics (``JobSpec.metric_names``): ``loss`` is the mean
        training loss over the steps; ``accuracy`` (classification) the fraction
        of correct predictions, ``mse``/``mae`` (regression) the mean squared and
        absolute error per target value, over all training examples seen (each
        measured before its step).
    steps:
        Optimizer steps taken.
    runtime:
        Which runtime trained.
    sums:
        The same metrics as summable ``MetricSum(total, weight)``, so metrics of
        many devices can be added and divided once (``edge.training.metrics``).
    """

    update: TensorDict
    num_samples: int
    metrics: dict[str, float]
    steps: int
    runtime: RuntimeName
    seconds: float = field(default=0.0, compare=False)
    sums: Mapping[str, MetricSum] = field(default_factory=dict)


class LocalStep(Protocol):
    """One runtime's SGD step over one local run.

    A step is built per run by a ``StepFactory`` from the job, the round's model
    and the hyperparameters: building it is the runtime's preparation (loading
    the program, building the network and its optimizer), so it may refuse the
    round's model. The optimizer lives as long as the step, which is what makes
    momentum carry across every batch.
    """

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, MetricSum]]:
        """One SGD step on a full batch.

        Returns the batch's mean loss and its output metric sums
        (``edge.training.metrics.output_sums``), both measured before the update.
        """
        ...

    def weights(self) -> TensorDict:
        """The current parameters under the network's ``state_dict`` names (copies)."""
        ...


StepFactory = Callable[[JobSpec, RoundModel, TrainHyperparams], LocalStep]
