"""Eager PyTorch local training: the reference the ExecuTorch program must match.

Used by simulated devices (about 40x faster per step than the ExecuTorch
portable kernels on a CPU) and by the parity gate as ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aggregation.tensors import TensorDict
from edge.jobs.spec import JobSpec, RuntimeName, TrainHyperparams
from edge.training.loop import DeviceTrainer
from edge.training.metrics import MetricSums, output_sums
from edge.training.state import model_from_state, state_dict_to_tensors
from edge.training.trainer import RoundModel, StepFactory
from edge.training.wrapper import LossAndPredictions


class PyTorchStep:
    """The exported module run eagerly, one ``torch.optim.SGD`` for the whole local run."""

    def __init__(self, job: JobSpec, model: RoundModel, hyperparams: TrainHyperparams) -> None:
        self._task = job.task
        self._network = model_from_state(job, model.state)
        self._module = LossAndPredictions(self._network, job.loss, job.task).train()
        self._optimizer = torch.optim.SGD(
            self._network.parameters(), lr=hyperparams.lr, momentum=hyperparams.momentum
        )

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, MetricSums]:
        self._optimizer.zero_grad(set_to_none=True)
        loss, outputs = self._module(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        self._optimizer.step()
        return float(loss.item()), output_sums(self._task, outputs.numpy(), y)

    def weights(self) -> TensorDict:
        return state_dict_to_tensors(self._network.state_dict())


@dataclass(frozen=True)
class PyTorchTrainer(DeviceTrainer):
    """``torch.optim.SGD`` over the job's network, one optimizer for the whole local run."""

    runtime: RuntimeName = "pytorch"
    make_step: StepFactory = PyTorchStep
