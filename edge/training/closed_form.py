"""Local SGD for closed-form (numpy) jobs such as hello-mobile.

Same optimizer semantics as ``torch.optim.SGD`` (momentum buffer starts as the
first gradient, then ``buf = momentum * buf + grad``; ``p -= lr * buf``), so a
closed-form job behaves like a network job, without torch or a program.
"""

from __future__ import annotations

import time

import numpy as np

from aggregation.tensors import TensorDict
from edge.jobs.spec import ClosedFormModel, JobSpec, RuntimeName, TrainHyperparams
from edge.training.batching import batch_plan
from edge.training.trainer import MetricsAccumulator, TrainResult, update_from
from infra.errors import ValidationError


def check_closed_form_state(job: JobSpec, model: ClosedFormModel, state: TensorDict) -> None:
    reference = model.initial_state(0)
    if state.keys() != reference.keys():
        raise ValidationError(
            f"job {job.name}: state has tensors {sorted(state)}, expected {sorted(reference)}"
        )
    for name, ref in reference.items():
        if state[name].shape != ref.shape or state[name].dtype != ref.dtype:
            raise ValidationError(
                f"job {job.name}: {name} is {state[name].dtype}{state[name].shape}, "
                f"expected {ref.dtype}{ref.shape}"
            )


def train_closed_form(
    job: JobSpec,
    model: ClosedFormModel,
    state: TensorDict,
    x: np.ndarray,
    y: np.ndarray,
    hyperparams: TrainHyperparams,
    *,
    seed: int,
    runtime: RuntimeName,
) -> TrainResult:
    """Local SGD with momentum on a numpy gradient formula; ``x``/``y`` already checked."""
    started = time.perf_counter()
    check_closed_form_state(job, model, state)
    current = {name: arr.copy() for name, arr in state.items()}
    momentum_buf: TensorDict | None = None
    acc = MetricsAccumulator()
    plan = batch_plan(
        x.shape[0],
        hyperparams.batch_size,
        local_epochs=hyperparams.local_epochs,
        max_steps=hyperparams.max_steps,
        seed=seed,
    )
    for idx in plan:
        step = model.loss_and_gradient(current, x[idx], y[idx])
        acc.add(step.loss, step.correct, idx.shape[0])
        if momentum_buf is None or hyperparams.momentum == 0:
            momentum_buf = {n: g.astype(np.float32, copy=True) for n, g in step.gradient.items()}
        else:
            for name, grad in step.gradient.items():
                momentum_buf[name] = np.float32(hyperparams.momentum) * momentum_buf[name] + grad
        for name, buf in momentum_buf.items():
            current[name] = current[name] - np.float32(hyperparams.lr) * buf
    return TrainResult(
        update=update_from(current, state),
        num_samples=int(x.shape[0]),
        metrics=acc.metrics(),
        steps=acc.steps,
        runtime=runtime,
        seconds=time.perf_counter() - started,
    )
