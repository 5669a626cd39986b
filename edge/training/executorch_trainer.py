"""On-device training through the ExecuTorch runtime, exactly as a phone runs it.

The program (exported from the round's global model) computes loss and gradients;
ExecuTorch's own SGD optimizer updates the program's parameters in place. The
optimizer is created once, after the first ``forward_backward`` (that is when the
training module exposes its parameters), so momentum carries across all batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from aggregation.tensors import TensorDict
from edge.jobs.spec import JobSpec, RuntimeName, TrainHyperparams
from edge.training.batching import batch_plan
from edge.training.closed_form import train_closed_form
from edge.training.errors import ProgramError
from edge.training.et_runtime import get_sgd_optimizer
from edge.training.program import TrainingProgram
from edge.training.trainer import (
    MetricsAccumulator,
    RoundModel,
    TrainResult,
    check_local_data,
    check_runtime,
    update_from,
)


def check_program_holds(program: TrainingProgram, state: TensorDict) -> None:
    """The program must start from the round's global weights, bit for bit.

    A program exported from another round (or another job) would train fine and
    produce a wrong update; this refuses it instead.
    """
    weights = program.parameters()
    if weights.keys() != state.keys():
        raise ProgramError(
            f"program parameters {sorted(weights)} differ from the global model's {sorted(state)}"
        )
    for name, arr in weights.items():
        if arr.shape != state[name].shape or not np.array_equal(arr, state[name]):
            raise ProgramError(
                f"program weights differ from the round's global model (first at {name}); "
                "it was exported from another model version"
            )


@dataclass(frozen=True)
class ExecuTorchTrainer:
    """Trains with a ``.pte`` training program on the ExecuTorch runtime."""

    runtime: RuntimeName = "executorch"

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
        if model.program is None:
            raise ProgramError(f"job {job.name}: the executorch runtime needs the round's program")
        started = time.perf_counter()
        program = TrainingProgram(model.program, expected_sha256=model.program_sha256)
        if program.batch_size != hyperparams.batch_size:
            raise ProgramError(
                f"the program was exported for batch size {program.batch_size} but the "
                f"hyperparameters ask for {hyperparams.batch_size}; export for that batch size"
            )
        acc = MetricsAccumulator()
        plan = batch_plan(
            x.shape[0],
            hyperparams.batch_size,
            local_epochs=hyperparams.local_epochs,
            max_steps=hyperparams.max_steps,
            seed=seed,
        )
        optimizer = None
        for idx in plan:
            yb = y[idx]
            loss, predictions = program.forward_backward(x[idx], yb)
            if optimizer is None:
                check_program_holds(program, model.state)
                optimizer = get_sgd_optimizer(
                    program.program_parameters(), hyperparams.lr, hyperparams.momentum
                )
            acc.add(loss, int(np.count_nonzero(predictions == yb)), idx.shape[0])
            optimizer.step(program.program_gradients())
        return TrainResult(
            update=update_from(program.parameters(), model.state),
            num_samples=int(x.shape[0]),
            metrics=acc.metrics(),
            steps=acc.steps,
            runtime=self.runtime,
            seconds=time.perf_counter() - started,
        )
