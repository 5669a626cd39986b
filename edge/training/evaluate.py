"""Held-out evaluation of a model state: the number a round report shows.

The metrics are the job's own (``JobSpec.metric_names``), computed by the same
functions as the devices' training metrics (``edge.training.metrics``), with the
loss averaged over examples. :func:`evaluate_sums` keeps them summable, for
evaluations split across devices or batches and divided once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from aggregation.tensors import TensorDict
from edge.jobs.spec import JobSpec
from edge.training.closed_form import check_closed_form_state, closed_form_model
from edge.training.inputs import check_local_data
from edge.training.metrics import (
    MetricSums,
    add_sums,
    correct_sums,
    loss_sums,
    means,
    output_sums,
)
from edge.training.state import model_from_state
from edge.training.wrapper import LossAndPredictions

Scorer = Callable[[np.ndarray, np.ndarray], tuple[float, MetricSums]]


def _closed_form_scorer(job: JobSpec, state: TensorDict) -> Scorer:
    model = closed_form_model(job)
    check_closed_form_state(job, model, state)

    def score(x: np.ndarray, y: np.ndarray) -> tuple[float, MetricSums]:
        step = model.loss_and_gradient(state, x, y)
        return step.loss, correct_sums(step.correct, x.shape[0])

    return score


def _network_scorer(job: JobSpec, state: TensorDict) -> Scorer:
    module = LossAndPredictions(model_from_state(job, state), job.loss, job.task).eval()

    def score(x: np.ndarray, y: np.ndarray) -> tuple[float, MetricSums]:
        with torch.no_grad():
            loss, outputs = module(torch.from_numpy(x), torch.from_numpy(y))
        return float(loss), output_sums(job.task, outputs.numpy(), y)

    return score


def evaluate_sums(
    job: JobSpec, state: TensorDict, x: np.ndarray, y: np.ndarray, *, batch_size: int = 500
) -> MetricSums:
    """The job's metrics of ``state`` on ``(x, y)`` as sums (eval mode, no gradients)."""
    x, y = check_local_data(job, x, y)
    scorer = (_closed_form_scorer if job.closed_form is not None else _network_scorer)(job, state)
    sums: MetricSums = {}
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        loss, batch = scorer(xb, yb)
        sums = add_sums(sums, loss_sums(loss, xb.shape[0]), batch)
    return sums


def evaluate(
    job: JobSpec, state: TensorDict, x: np.ndarray, y: np.ndarray, *, batch_size: int = 500
) -> dict[str, float]:
    """The job's metrics of ``state`` on ``(x, y)``: mean loss over examples, and the rest."""
    return means(evaluate_sums(job, state, x, y, batch_size=batch_size))
