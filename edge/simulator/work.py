"""What crosses the process boundary between the simulator and its training workers.

Kept free of torch and ExecuTorch imports on purpose: importing the training
stack costs seconds (ExecuTorch's exporter alone is most of it), and the
process that runs thousands of devices' HTTP never trains. Workers import it
on first use, in ``train_in_worker`` and ``warm_worker``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


class FatalTrainingError(Exception):
    """Training cannot work for any device (unknown job, missing dataset): stop the run."""


@dataclass(frozen=True)
class TrainRequest:
    """One device's local training for one round (or, for ``evaluate_in_worker``, what it
    evaluates: the downloaded weights on its held-out data)."""

    job: str
    runtime: str
    device_index: int
    weights: bytes  # the round's global model, as downloaded (safetensors)
    program: bytes | None = None  # the .pte, for ExecuTorch network jobs
    hyperparams: dict[str, Any] = field(default_factory=dict)
    data_hint: dict[str, Any] | None = None
    fleet_size: int = 1  # partitions when the task has no data hint
    fleet_seed: int = 0


@dataclass(frozen=True)
class TrainReply:
    """The device's result, ready to upload."""

    update: bytes  # safetensors of new - old
    num_samples: int
    metrics: dict[str, float]
    seconds: float  # real compute time (slow devices stretch it)
    partition: int


@dataclass(frozen=True)
class EvaluateReply:
    """A device's evaluation of the global model on its held-out data: metrics only.

    ``num_samples`` 0: the device holds no held-out examples, so it has nothing to report.
    """

    num_samples: int
    metrics: dict[str, float]
    seconds: float
    partition: int


def init_worker() -> None:
    """One thread per worker: two workers on two cores, no oversubscription."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


def warm_worker(job: str) -> str:
    """Import the training stack and resolve the job, so the first device does not wait."""
    from edge.simulator import training  # deferred: see the module docstring

    return training.resolve_job(job)


def train_in_worker(request: TrainRequest) -> TrainReply:
    """Entry point run in a worker process for one device's round."""
    from edge.simulator import training  # deferred: see the module docstring

    return training.train_device(request)


def evaluate_in_worker(request: TrainRequest) -> EvaluateReply:
    """Entry point run in a worker process for one device's evaluation task."""
    from edge.simulator import training  # deferred: see the module docstring

    return training.evaluate_device(request)
