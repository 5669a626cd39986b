"""Held-out evaluation of a model state: the number a round report shows."""

from __future__ import annotations

import numpy as np
import torch

from aggregation.tensors import TensorDict
from edge.jobs.spec import JobSpec
from edge.training.closed_form import check_closed_form_state
from edge.training.state import model_from_state
from edge.training.trainer import check_local_data
from edge.training.wrapper import LossAndPredictions


def evaluate(
    job: JobSpec, state: TensorDict, x: np.ndarray, y: np.ndarray, *, batch_size: int = 500
) -> dict[str, float]:
    """Mean loss and accuracy of ``state`` on ``(x, y)`` (eval mode, no gradients)."""
    x, y = check_local_data(job, x, y)
    loss_sum = 0.0
    correct = 0
    if job.closed_form is not None:
        check_closed_form_state(job, job.closed_form, state)
        for start in range(0, x.shape[0], batch_size):
            step = job.closed_form.loss_and_gradient(
                state, x[start : start + batch_size], y[start : start + batch_size]
            )
            loss_sum += step.loss * min(batch_size, x.shape[0] - start)
            correct += step.correct
    else:
        scorer = LossAndPredictions(model_from_state(job, state), job.loss).eval()
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb = torch.from_numpy(x[start : start + batch_size])
                yb = torch.from_numpy(y[start : start + batch_size])
                loss, predictions = scorer(xb, yb)
                loss_sum += float(loss) * xb.shape[0]
                correct += int((predictions == yb).sum())
    return {"loss": loss_sum / x.shape[0], "accuracy": correct / x.shape[0]}
