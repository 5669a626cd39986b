"""Training and evaluation metrics as summable totals, one definition for every runtime.

The ExecuTorch program, the eager PyTorch trainer, the closed-form trainer and
the server-side ``evaluate`` all hand their raw per-batch numbers (the loss and
the model's outputs) to these functions, so a metric means the same thing
wherever it was measured. Metrics are kept as ``MetricSum(total, weight)`` (the
type the aggregation tree already sums), never as means: sums from batches,
devices or tree levels are added, and divided once, by :func:`means`.

What each task reports (``edge.jobs.spec.TASK_METRICS``):

* ``classification``: ``loss`` and ``accuracy``, the fraction of examples whose
  predicted class (the arg-max the program returns) equals the label;
* ``regression``: ``loss``, ``mse`` and ``mae``, the mean squared and absolute
  error per target value (every element of every target counts once).

The loss is whatever the job's loss function returns for a batch (a batch
mean); its weight is the caller's choice: one per step for training (the mean
loss over steps), the batch size for evaluation (the mean over examples).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregation.partial import MetricSum
from edge.jobs.spec import TaskKind
from infra.errors import ValidationError

MetricSums = dict[str, MetricSum]


def loss_sums(loss: float, weight: float) -> MetricSums:
    """A batch's mean loss, weighted (1 per training step, the batch size when evaluating)."""
    return {"loss": MetricSum(loss * weight, float(weight))}


def correct_sums(correct: int, examples: int) -> MetricSums:
    """Accuracy as ``correct`` out of ``examples``."""
    return {"accuracy": MetricSum(float(correct), float(examples))}


def output_sums(task: TaskKind, outputs: np.ndarray, targets: np.ndarray) -> MetricSums:
    """Everything but the loss, from one batch of model outputs.

    ``outputs``: predicted classes ``(B,)`` for classification, predicted values
    of the targets' shape for regression (``float64`` sums, whatever the dtype).
    """
    if outputs.shape != targets.shape:
        raise ValidationError(
            f"{task} outputs have shape {tuple(outputs.shape)} but the targets "
            f"{tuple(targets.shape)}; the model must return one "
            f"{'class per example' if task == 'classification' else 'value per target'}"
        )
    if task == "classification":
        return correct_sums(int(np.count_nonzero(outputs == targets)), targets.shape[0])
    error = outputs.astype(np.float64) - targets.astype(np.float64)
    count = float(error.size)
    return {
        "mse": MetricSum(float(np.sum(error * error)), count),
        "mae": MetricSum(float(np.sum(np.abs(error))), count),
    }


def add_sums(*parts: Mapping[str, MetricSum]) -> MetricSums:
    """Sum several metric sums key by key (keys keep their first-seen order)."""
    total: MetricSums = {}
    for part in parts:
        for name, (value, weight) in part.items():
            old = total.get(name)
            total[name] = (
                MetricSum(value, weight)
                if old is None
                else MetricSum(old.total + value, old.weight + weight)
            )
    return total


def means(sums: Mapping[str, MetricSum]) -> dict[str, float]:
    """Each metric's total divided by its weight: the one division, done last."""
    empty = [name for name, s in sums.items() if s.weight <= 0]
    if empty:
        raise ValidationError(f"metrics {empty} have no weight: nothing was measured")
    return {name: s.total / s.weight for name, s in sums.items()}
