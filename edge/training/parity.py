"""The parity gate: the ExecuTorch program must train like eager PyTorch.

Both trainers start from the same state and see the same batches (the job's
example batches, in the same order) for at least 10 SGD steps with momentum, so
a wrong kernel, a wrong gradient or an optimizer that drops its momentum shows
up as a difference in the trained weights. No program is published when the
largest difference exceeds the tolerance (``publish.py``, ``canopy export``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aggregation.tensors import TensorDict
from edge.jobs.spec import JobSpec, TrainHyperparams
from edge.training.executorch_trainer import ExecuTorchTrainer
from edge.training.export import export_job_program
from edge.training.program import TrainingProgram
from edge.training.pytorch_trainer import PyTorchTrainer
from edge.training.state import initial_state
from edge.training.trainer import RoundModel
from infra.errors import ConfigError

MIN_STEPS = 10
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityReport:
    """Largest absolute weight difference after training, overall and per tensor."""

    job: str
    max_abs_diff: float
    per_tensor: dict[str, float]
    passed: bool
    tolerance: float
    steps: int
    batch_size: int
    loss_executorch: float
    loss_pytorch: float


def check_parity(
    job: JobSpec,
    *,
    steps: int = MIN_STEPS,
    momentum: float = 0.9,
    tol: float = DEFAULT_TOLERANCE,
    state: TensorDict | None = None,
    program: bytes | None = None,
    batch_size: int | None = None,
    seed: int = 0,
) -> ParityReport:
    """Train both runtimes identically and compare the trained weights.

    Parameters
    ----------
    job:
        The job to check.
    steps:
        SGD steps, at least 10 so momentum has time to matter.
    momentum:
        Must be > 0: an optimizer that forgets its momentum buffer between batches
        passes a momentum-free check.
    tol:
        Largest acceptable absolute difference of any weight.
    state:
        Start state (default: the job's initial state for ``seed``).
    program:
        The exact ``.pte`` to check (default: exported from ``state`` here).
    batch_size:
        Default: the program's batch size, else the job's.
    seed:
        Seed of the initial state, the example batches and the batch order.
    """
    if steps < MIN_STEPS:
        raise ConfigError(f"parity needs at least {MIN_STEPS} steps, got {steps}")
    if not 0 < momentum < 1:
        raise ConfigError(
            f"parity needs 0 < momentum < 1 to exercise the optimizer, got {momentum}"
        )
    state = state if state is not None else initial_state(job, seed)
    if program is not None:
        batch_size = batch_size or TrainingProgram(program).batch_size
    batch_size = batch_size or job.hyperparams.batch_size
    if program is None and job.has_program:
        exported = export_job_program(job, state, batch_size=batch_size, seed=seed)
        program = exported.pte if exported is not None else None
    batches = [job.make_example_batch(batch_size, seed + i) for i in range(steps)]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    hyperparams = TrainHyperparams(
        local_epochs=1,
        max_steps=steps,
        batch_size=batch_size,
        lr=job.hyperparams.lr,
        momentum=momentum,
    )
    model = RoundModel(state=state, program=program)
    et = ExecuTorchTrainer().train(job, model, x, y, hyperparams, seed=seed)
    pt = PyTorchTrainer().train(job, model, x, y, hyperparams, seed=seed)
    per_tensor = {
        name: float(np.max(np.abs(et.update[name] - pt.update[name]), initial=0.0))
        for name in pt.update
    }
    worst = max(per_tensor.values(), default=0.0)
    return ParityReport(
        job=job.name,
        max_abs_diff=worst,
        per_tensor=per_tensor,
        passed=bool(worst <= tol),
        tolerance=tol,
        steps=et.steps,
        batch_size=batch_size,
        loss_executorch=et.metrics["loss"],
        loss_pytorch=pt.metrics["loss"],
    )
