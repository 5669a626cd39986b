"""The checks every device update passes before it may touch a sum.

An update comes from a phone, so it is untrusted input: a tensor can be missing,
extra, mis-shaped, of the wrong dtype, NaN, or simply huge. One bad update summed
in poisons the whole round, and a sum cannot be "un-added", so the leaf checks
each update against the global model's spec first and refuses it with
:class:`UpdateRejected`, whose machine-readable ``reason`` lets the caller count
rejections by cause and whose message names the device and the tensor.

The optional L2-norm bound is taken over the whole update (all tensors as one
vector), as in DP-FedAvg (McMahan et al. 2018, https://arxiv.org/abs/1710.06963).
It either clips (the update is scaled down to the bound; the scale is returned, not
applied, so the accumulator can fold it into the weight at no extra memory pass)
or rejects. A bound chosen after the check (the leaf's adaptive bound,
``aggregation.clipping``) is applied with :func:`clip_to`.

The optional weight cap refuses a device claiming more samples than its task
allows (``max_num_samples``, the largest partition): a sample count is the
device's own word, and without a cap one phone claiming 10^9 samples would
decide the weighted mean on its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from aggregation.partial import check_metrics, check_weight
from aggregation.tensors import TensorDict, TensorSpec
from infra.errors import ConfigError, ValidationError

RejectReason = Literal[
    "missing-tensor",
    "unknown-tensor",
    "shape",
    "dtype",
    "non-finite",
    "norm-bound",
    "bad-weight",
    "weight-cap",
    "bad-metric",
]
REJECT_REASONS: frozenset[str] = frozenset(get_args(RejectReason))

ClipReason = Literal["norm-bound", "adaptive-norm"]
"""Why an update was scaled down: the explicit ``max_norm``, or the adaptive bound."""
CLIP_REASONS: frozenset[str] = frozenset(get_args(ClipReason))

NormPolicy = Literal["clip", "reject"]


class UpdateRejected(ValidationError):
    """A device update failed a guard and was not summed.

    Attributes
    ----------
    device_id
        The device whose update was refused.
    tensor
        The offending tensor, or ``None`` when the problem is not one tensor's
        (weight, metrics, the norm of the whole update).
    reason
        One of :data:`REJECT_REASONS`, for counting and alerting.
    """

    def __init__(
        self, message: str, *, device_id: str, tensor: str | None, reason: RejectReason
    ) -> None:
        super().__init__(message)
        self.device_id = device_id
        self.tensor = tensor
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields would be lost by BaseException's default pickling,
        # and rejections travel between processes (Prefect task results, workers).
        return (_rebuild_rejection, (str(self), self.device_id, self.tensor, self.reason))


def _rebuild_rejection(
    message: str, device_id: str, tensor: str | None, reason: RejectReason
) -> UpdateRejected:
    return UpdateRejected(message, device_id=device_id, tensor=tensor, reason=reason)


@dataclass(frozen=True)
class GuardConfig:
    """How strict the guard is beyond the spec checks, which are always on.

    Parameters
    ----------
    max_norm
        Bound on the L2 norm of the whole update, or ``None`` for no bound
        (default: None).
    on_norm_exceeded
        ``"clip"`` scales the update down to ``max_norm``; ``"reject"`` refuses
        it (default: "clip").
    max_weight
        Largest sample count a device may claim (the task's ``max_num_samples``),
        or ``None`` for no cap (default: None). A larger claim is rejected
        (``weight-cap``), not lowered: the device's report is not to be trusted.
    """

    max_norm: float | None = None
    on_norm_exceeded: NormPolicy = "clip"
    max_weight: float | None = None

    def __post_init__(self) -> None:
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0.0):
            raise ConfigError(f"max_norm must be a positive finite number, got {self.max_norm!r}")
        if self.max_weight is not None and not (
            math.isfinite(self.max_weight) and self.max_weight > 0.0
        ):
            raise ConfigError(
                f"max_weight must be a positive finite number, got {self.max_weight!r}"
            )
        if self.on_norm_exceeded not in get_args(NormPolicy):
            raise ConfigError(
                f"on_norm_exceeded must be 'clip' or 'reject', got {self.on_norm_exceeded!r}"
            )


@dataclass(frozen=True)
class CheckedUpdate:
    """An update that passed every guard, ready for ``Accumulator.add_checked``.

    ``tensors`` are the device's arrays, not copied and not yet clipped: the
    clip is carried as ``scale`` (1.0 when the norm was within the bound) and
    its cause as ``clip_reason``. ``norm`` is the norm as sent, before any clip.
    """

    device_id: str
    tensors: Mapping[str, np.ndarray]
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)
    norm: float = 0.0
    scale: float = 1.0
    clip_reason: ClipReason | None = None

    @property
    def clipped(self) -> bool:
        return self.scale < 1.0

    def scaled_tensors(self) -> TensorDict:
        """The update as summed: clipped copies if clipped, else the arrays themselves."""
        if not self.clipped:
            return dict(self.tensors)
        return {
            name: (arr * self.scale).astype(arr.dtype, copy=False)
            for name, arr in self.tensors.items()
        }


def _sum_of_squares(arr: np.ndarray) -> float:
    """Sum of squares in one BLAS pass; NaN or inf if any element is non-finite.

    Squares are non-negative, so one NaN or inf element always makes the result
    non-finite: the same pass is the finiteness check. Integer arrays go through
    float64 so the sum cannot wrap around.
    """
    flat = arr.reshape(-1)
    if flat.dtype.char not in "fd":  # not float32/float64 (``dtype.name`` is slow to read)
        flat = flat.astype(np.float64)
    return float(np.dot(flat, flat))


def _stable_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of finite values whose float sum of squares overflowed: rescale first."""
    peak = max(float(np.max(np.abs(a))) for a in arrays.values() if a.size)
    total = 0.0
    for arr in arrays.values():
        scaled = arr.astype(np.float64) / peak
        total += float(np.dot(scaled.reshape(-1), scaled.reshape(-1)))
    return peak * math.sqrt(total)


def check_update(
    update: Mapping[str, np.ndarray],
    *,
    spec: Mapping[str, TensorSpec],
    device_id: str,
    weight: float,
    metrics: Mapping[str, float] | None = None,
    config: GuardConfig = GuardConfig(),  # frozen dataclass, so sharing the default is safe
) -> CheckedUpdate:
    """Check one device update against the global model's spec, or raise ``UpdateRejected``.

    Checks, in order: weight (positive finite sample count, at most
    ``config.max_weight``), metric values (finite), tensor names (none missing,
    none unknown), each tensor's shape and dtype, finiteness of every value (and
    of the norm), then the L2 norm of the whole update against
    ``config.max_norm``. Nothing is modified; the clip is returned as a scale
    factor.
    """

    def reject(reason: RejectReason, tensor: str | None, detail: str) -> UpdateRejected:
        where = f"tensor {tensor!r} of " if tensor is not None else ""
        return UpdateRejected(
            f"rejected {where}update from device {device_id!r} ({reason}): {detail}; "
            "the update is not summed",
            device_id=device_id,
            tensor=tensor,
            reason=reason,
        )

    try:
        w = check_weight(weight, "sample count")
    except ValidationError as exc:
        raise reject("bad-weight", None, str(exc)) from None
    if config.max_weight is not None and w > config.max_weight:
        raise reject(
            "weight-cap",
            None,
            f"claims {w:.6g} samples, more than the {config.max_weight:.6g} its task allows",
        )
    try:
        values = check_metrics(metrics)
    except ValidationError as exc:
        raise reject("bad-metric", None, str(exc)) from None

    missing = sorted(set(spec) - set(update))
    unknown = sorted(set(update) - set(spec))
    if missing:
        extra = f"; also unknown: {unknown}" if unknown else ""
        raise reject("missing-tensor", missing[0], f"missing tensors {missing}{extra}")
    if unknown:
        raise reject("unknown-tensor", unknown[0], f"tensors not in the model {unknown}")

    for name, (shape, dtype) in spec.items():
        arr = update[name]
        if not isinstance(arr, np.ndarray):
            raise reject("dtype", name, f"expected a numpy array, got {type(arr).__name__}")
        if arr.shape != tuple(shape):
            raise reject("shape", name, f"shape {arr.shape}, expected {tuple(shape)}")
        if arr.dtype != dtype:  # compares with the name; ``arr.dtype.name`` is slow to read
            raise reject("dtype", name, f"dtype {arr.dtype.name}, expected {dtype}")

    squares = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is told apart below
        for name in spec:
            part = _sum_of_squares(update[name])
            if not math.isfinite(part) and not np.isfinite(update[name]).all():
                bad = int(np.size(update[name]) - np.count_nonzero(np.isfinite(update[name])))
                raise reject("non-finite", name, f"{bad} NaN or infinite values")
            squares += part
    norm = math.sqrt(squares)
    if not math.isfinite(norm):  # finite values whose squares overflowed
        norm = _stable_norm(update)
    if not math.isfinite(norm):  # float64 values near the top of the range: no scale can fix it
        raise reject("non-finite", None, "the L2 norm of the update overflows float64")

    checked = CheckedUpdate(
        device_id=device_id, tensors=update, weight=w, metrics=values, norm=norm
    )
    if config.max_norm is not None and norm > config.max_norm:
        if config.on_norm_exceeded == "reject":
            raise reject("norm-bound", None, f"L2 norm {norm:.6g} exceeds {config.max_norm:.6g}")
        checked = clip_to(checked, config.max_norm, "norm-bound")
    return checked


def clip_to(checked: CheckedUpdate, bound: float, reason: ClipReason) -> CheckedUpdate:
    """``checked`` scaled (lazily, via ``scale``) so its norm is at most ``bound``.

    Returns ``checked`` itself when it is within the bound. A second, tighter
    bound wins; the recorded ``norm`` stays the norm as sent.
    """
    if not (math.isfinite(bound) and bound > 0.0):
        raise ConfigError(f"a norm bound must be a positive finite number, got {bound!r}")
    if checked.norm * checked.scale <= bound:
        return checked
    return dataclasses.replace(checked, scale=bound / checked.norm, clip_reason=reason)
