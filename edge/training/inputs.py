"""What a device's local data must look like before any step runs.

The same checks guard training on every runtime and the server's evaluation, so
a shape or label mistake fails with one message, naming the job, wherever it
shows up, instead of as a runtime error deep inside a kernel.
"""

from __future__ import annotations

import numpy as np

from edge.jobs.spec import JobSpec, RuntimeName
from infra.errors import ConfigError, ValidationError


def check_local_data(job: JobSpec, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a device's data against the job.

    Features must be ``(n, *job.input_shape)``, finite, any real dtype (returned
    as contiguous ``float32``). Classification labels are integers ``(n,)`` in
    ``0 .. num_classes - 1`` (returned as ``int64``); regression targets are real
    numbers ``(n, *job.target_shape)``, finite (returned as ``float32``).
    """
    x = np.asarray(x)
    y = np.asarray(y)
    expected = ("n", *job.input_shape)
    if x.ndim != len(expected) or tuple(x.shape[1:]) != job.input_shape:
        raise ValidationError(
            f"job {job.name}: local features have shape {tuple(x.shape)}, expected {expected}"
        )
    target_shape = (x.shape[0], *job.target_shape)
    if y.shape != target_shape:
        what = "labels" if job.task == "classification" else "targets"
        raise ValidationError(
            f"job {job.name}: {what} have shape {tuple(y.shape)}, expected {target_shape}"
        )
    if x.shape[0] == 0:
        raise ValidationError(f"job {job.name}: the device has no local data (empty partition)")
    targets = _check_labels(job, y) if job.task == "classification" else _check_targets(job, y)
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x32).all():
        raise ValidationError(f"job {job.name}: local features contain NaN or infinity")
    return x32, targets


def _check_labels(job: JobSpec, y: np.ndarray) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise ValidationError(f"job {job.name}: labels must be integers, got {y.dtype}")
    if y.min() < 0 or y.max() >= job.num_classes:
        raise ValidationError(
            f"job {job.name}: labels must lie in 0..{job.num_classes - 1}, "
            f"got {int(y.min())}..{int(y.max())}"
        )
    return y.astype(np.int64, copy=False)


def _check_targets(job: JobSpec, y: np.ndarray) -> np.ndarray:
    if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise ValidationError(f"job {job.name}: regression targets must be numbers, got {y.dtype}")
    y32 = np.ascontiguousarray(y, dtype=np.float32)
    if not np.isfinite(y32).all():
        raise ValidationError(f"job {job.name}: regression targets contain NaN or infinity")
    return y32


def check_runtime(job: JobSpec, runtime: RuntimeName) -> None:
    """Refuse a runtime the job does not support (before any work is done)."""
    if runtime not in job.runtimes:
        raise ConfigError(
            f"job {job.name} does not run on {runtime}; it supports {sorted(job.runtimes)}"
        )
