"""Eager PyTorch local training: the reference the ExecuTorch program must match.

Used by simulated devices (about 40x faster per step than the ExecuTorch
portable kernels on a CPU) and by the parity gate as ground truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from edge.jobs.spec import JobSpec, RuntimeName, TrainHyperparams
from edge.training.batching import batch_plan
from edge.training.closed_form import train_closed_form
from edge.training.state import model_from_state, state_dict_to_tensors
from edge.training.trainer import (
    MetricsAccumulator,
    RoundModel,
    TrainResult,
    check_local_data,
    check_runtime,
    update_from,
)
from edge.training.wrapper import LossAndPredictions


@dataclass(frozen=True)
class PyTorchTrainer:
    """``torch.optim.SGD`` over the job's network, one optimizer for the whole local run."""

    runtime: RuntimeName = "pytorch"

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
        check_runtime(job, self.runtime)
        x, y = check_local_data(job, x, y)
        if job.closed_form is not None:
            return train_closed_form(
                job,
                job.closed_form,
                model.state,
                x,
                y,
                hyperparams,
                seed=seed,
                runtime=self.runtime,
            )
        started = time.perf_counter()
        network = model_from_state(job, model.state)
        step_module = LossAndPredictions(network, job.loss).train()
        optimizer = torch.optim.SGD(
            network.parameters(), lr=hyperparams.lr, momentum=hyperparams.momentum
        )
        acc = MetricsAccumulator()
        plan = batch_plan(
            x.shape[0],
            hyperparams.batch_size,
            local_epochs=hyperparams.local_epochs,
            max_steps=hyperparams.max_steps,
            seed=seed,
        )
        for idx in plan:
            xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss, predictions = step_module(xb, yb)
            loss.backward()
            optimizer.step()
            acc.add(float(loss.item()), int((predictions == yb).sum()), idx.shape[0])
        trained = state_dict_to_tensors(network.state_dict())
        return TrainResult(
            update=update_from(trained, model.state),
            num_samples=int(x.shape[0]),
            metrics=acc.metrics(),
            steps=acc.steps,
            runtime=self.runtime,
            seconds=time.perf_counter() - started,
        )
