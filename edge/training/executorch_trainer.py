"""On-device training through the ExecuTorch runtime, exactly as a phone runs it.

The program (exported from the round's global model) computes loss and gradients;
ExecuTorch's own SGD optimizer updates the program's parameters in place. The
optimizer is created once, after the first ``forward_backward`` (that is when the
training module exposes its parameters), so momentum carries across all batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregation.tensors import TensorDict
from edge.jobs.spec import JobSpec, RuntimeName, TrainHyperparams
from edge.training.errors import ProgramError
from edge.training.et_runtime import get_sgd_optimizer
from edge.training.loop import DeviceTrainer
from edge.training.metrics import MetricSums, output_sums
from edge.training.program import TrainingProgram
from edge.training.trainer import RoundModel, StepFactory


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


class ExecuTorchStep:
    """``forward_backward`` in the program, then ExecuTorch's SGD step on its parameters."""

    def __init__(self, job: JobSpec, model: RoundModel, hyperparams: TrainHyperparams) -> None:
        if model.program is None:
            raise ProgramError(f"job {job.name}: the executorch runtime needs the round's program")
        self._program = TrainingProgram(model.program, expected_sha256=model.program_sha256)
        if self._program.batch_size != hyperparams.batch_size:
            raise ProgramError(
                f"the program was exported for batch size {self._program.batch_size} but the "
                f"hyperparameters ask for {hyperparams.batch_size}; export for that batch size"
            )
        self._task = job.task
        self._state = model.state
        self._hyperparams = hyperparams
        self._optimizer: Any = None  # ExecuTorch's SGD, built once parameters are visible

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, MetricSums]:
        program = self._program
        loss, outputs = program.forward_backward(x, y)
        sums = output_sums(self._task, outputs, y)
        if self._optimizer is None:
            check_program_holds(program, self._state)
            self._optimizer = get_sgd_optimizer(
                program.program_parameters(), self._hyperparams.lr, self._hyperparams.momentum
            )
        self._optimizer.step(program.program_gradients())
        return loss, sums

    def weights(self) -> TensorDict:
        return self._program.parameters()


@dataclass(frozen=True)
class ExecuTorchTrainer(DeviceTrainer):
    """Trains with a ``.pte`` training program on the ExecuTorch runtime."""

    runtime: RuntimeName = "executorch"
    make_step: StepFactory = ExecuTorchStep
