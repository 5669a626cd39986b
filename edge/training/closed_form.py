"""The local step of closed-form (numpy) jobs such as hello-mobile.

Same optimizer semantics as ``torch.optim.SGD`` (momentum buffer starts as the
first gradient, then ``buf = momentum * buf + grad``; ``p -= lr * buf``), so a
closed-form job behaves like a network job, without torch or a program. Every
runtime uses this step for closed-form jobs, so their parity is exact.
"""

from __future__ import annotations

import numpy as np

from aggregation.tensors import TensorDict
from edge.jobs.spec import ClosedFormModel, JobSpec, TrainHyperparams
from edge.training.metrics import MetricSums, correct_sums
from edge.training.trainer import RoundModel
from infra.errors import ConfigError, ValidationError


def check_closed_form_state(job: JobSpec, model: ClosedFormModel, state: TensorDict) -> None:
    """Refuse a state whose tensors differ in name, shape or dtype from the model's."""
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


def closed_form_model(job: JobSpec) -> ClosedFormModel:
    """The job's numpy model (closed-form jobs only)."""
    if job.closed_form is None:
        raise ConfigError(f"job {job.name} has a network, not a closed-form model")
    return job.closed_form


class ClosedFormStep:
    """Local SGD with momentum on the job's numpy gradient formula."""

    def __init__(self, job: JobSpec, model: RoundModel, hyperparams: TrainHyperparams) -> None:
        self._model = closed_form_model(job)
        check_closed_form_state(job, self._model, model.state)
        self._current = {name: arr.copy() for name, arr in model.state.items()}
        self._momentum_buf: TensorDict | None = None
        self._lr = np.float32(hyperparams.lr)
        self._momentum = hyperparams.momentum

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, MetricSums]:
        result = self._model.loss_and_gradient(self._current, x, y)
        # A diverging run overflows here; the loop refuses its non-finite loss next.
        with np.errstate(over="ignore", invalid="ignore"):
            if self._momentum_buf is None or self._momentum == 0:
                self._momentum_buf = {
                    n: g.astype(np.float32, copy=True) for n, g in result.gradient.items()
                }
            else:
                for name, grad in result.gradient.items():
                    self._momentum_buf[name] = (
                        np.float32(self._momentum) * self._momentum_buf[name] + grad
                    )
            for name, buf in self._momentum_buf.items():
                self._current[name] = self._current[name] - self._lr * buf
        return result.loss, correct_sums(result.correct, x.shape[0])

    def weights(self) -> TensorDict:
        return {name: arr.copy() for name, arr in self._current.items()}
