"""The one device training loop, shared by every runtime.

Each runtime contributes only its step (``LocalStep``: ExecuTorch's program and
optimizer, eager PyTorch, or the numpy closed form). Everything around the step
is done here, once, in the same order for all of them: validate the runtime and
the data, build the step, follow the seeded batch plan, refuse non-finite
losses, sum the metrics, and report the update as new minus old. That the
runtimes share this code is what keeps their results comparable step for step
(the parity gate compares only what the steps compute).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from aggregation.tensors import TensorDict
from edge.jobs.spec import JobSpec, RuntimeName, TrainHyperparams
from edge.training.batching import batch_plan
from edge.training.closed_form import ClosedFormStep
from edge.training.errors import TrainingError
from edge.training.inputs import check_local_data, check_runtime
from edge.training.metrics import MetricSums, add_sums, loss_sums, means
from edge.training.trainer import RoundModel, StepFactory, TrainResult


def train_locally(
    job: JobSpec,
    model: RoundModel,
    x: np.ndarray,
    y: np.ndarray,
    hyperparams: TrainHyperparams,
    make_step: StepFactory,
    *,
    runtime: RuntimeName,
    seed: int = 0,
) -> TrainResult:
    """Local SGD from ``model.state`` on ``(x, y)`` with ``make_step``'s runtime.

    Closed-form jobs train with the numpy step whatever the runtime, so both
    runtimes give the same result by construction.
    """
    check_runtime(job, runtime)
    x, y = check_local_data(job, x, y)
    started = time.perf_counter()
    step = (ClosedFormStep if job.closed_form is not None else make_step)(job, model, hyperparams)
    plan = batch_plan(
        x.shape[0],
        hyperparams.batch_size,
        local_epochs=hyperparams.local_epochs,
        max_steps=hyperparams.max_steps,
        seed=seed,
    )
    sums: MetricSums = {}
    for done, idx in enumerate(plan):
        loss, batch = step.step(x[idx], y[idx])
        if not math.isfinite(loss):
            raise TrainingError(
                f"training loss became {loss} at step {done + 1}; the update is unusable "
                "(lower the learning rate?)"
            )
        sums = add_sums(sums, loss_sums(loss, 1.0), batch)
    return TrainResult(
        update=update_from(step.weights(), model.state),
        num_samples=int(x.shape[0]),
        metrics=means(sums),
        steps=len(plan),
        runtime=runtime,
        seconds=time.perf_counter() - started,
        sums=sums,
    )


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


@dataclass(frozen=True)
class DeviceTrainer:
    """Trains one device's local data from the round's model, on one runtime.

    ``make_step`` is the runtime's ``LocalStep`` factory; everything else is
    :func:`train_locally`. Stateless and shareable: a fresh step (and optimizer)
    is built for every run.
    """

    runtime: RuntimeName
    make_step: StepFactory

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
        return train_locally(
            job, model, x, y, hyperparams, self.make_step, runtime=self.runtime, seed=seed
        )
