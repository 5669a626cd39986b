"""Federated evaluation's sums: what devices measured on their own held-out data, added up.

In an evaluation task a device trains nothing: it evaluates the global model
on examples it never trained on and reports, per metric, the mean over those
examples and how many there were (the weight). A leaf turns each report into
``MetricSum(mean * n, n)``, the type the aggregation tree already sums for
training metrics (``aggregation.partial.MetricSum``), so leaves' sums add in any
order and grouping and the root divides once (:meth:`EvaluationSums.means`).
Averaging the devices' means instead would weight a device holding 3 examples
like one holding 300.

``mean * n`` recovers the device's exact sum for every metric Canopy defines
(``edge.training.metrics``): accuracy, loss averaged over examples, and MSE and
MAE averaged over target values (their weight is ``n`` times a constant, which
cancels in the division).

``EvaluationCollector`` is a leaf's intake, like ``aggregation.collector.LeafCollector``
for updates: first report per selected device for the current task and model,
the metrics the task asked for and nothing else, a weight within the task's cap.
Everything here is pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aggregation.collector import ACCEPTED, DUPLICATE, task_refusal
from aggregation.partial import MetricSum
from infra.errors import ValidationError

__all__ = ["ACCEPTED", "DUPLICATE", "EvaluationCollector", "EvaluationSums", "add_metric_sums"]


def add_metric_sums(*parts: Mapping[str, MetricSum]) -> dict[str, MetricSum]:
    """Sum metric sums key by key (keys keep their first-seen order)."""
    total: dict[str, MetricSum] = {}
    for part in parts:
        for name, (value, weight) in part.items():
            old = total.get(name, MetricSum(0.0, 0.0))
            total[name] = MetricSum(old.total + value, old.weight + weight)
    return total


@dataclass(frozen=True)
class EvaluationSums:
    """Devices, examples and per-metric sums of one or more devices' evaluations.

    ``+`` is associative and commutative and :meth:`zero` is its identity, so
    leaves, tree levels and retries may add them in any grouping.
    """

    devices: int = 0
    samples: int = 0
    metrics: Mapping[str, MetricSum] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.devices < 0 or self.samples < 0:
            raise ValidationError(
                f"evaluation sums: devices ({self.devices}) and samples ({self.samples}) "
                "must be >= 0"
            )
        if (self.devices == 0) != (self.samples == 0) or (self.devices == 0 and self.metrics):
            raise ValidationError(
                "evaluation sums: devices, samples and metrics are all zero/empty or all not "
                f"(devices={self.devices}, samples={self.samples}, metrics={len(self.metrics)})"
            )
        checked: dict[str, MetricSum] = {}
        for name in sorted(self.metrics):
            total, weight = (float(v) for v in self.metrics[name])
            if not (math.isfinite(total) and math.isfinite(weight) and weight > 0.0):
                raise ValidationError(
                    f"evaluation sums: metric {name!r} needs a finite sum and a positive "
                    f"finite weight, got ({total!r}, {weight!r})"
                )
            checked[name] = MetricSum(total, weight)
        object.__setattr__(self, "metrics", checked)  # a copy: callers cannot change it

    @classmethod
    def zero(cls) -> EvaluationSums:
        return cls()

    @classmethod
    def of_report(cls, num_samples: int, metrics: Mapping[str, float]) -> EvaluationSums:
        """One device's report: the mean of each metric over ``num_samples`` examples."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValidationError(f"an evaluation needs num_samples >= 1, got {num_samples!r}")
        if not metrics:
            raise ValidationError("an evaluation must report at least one metric")
        n = float(num_samples)
        return cls(
            devices=1,
            samples=num_samples,
            metrics={name: MetricSum(float(mean) * n, n) for name, mean in metrics.items()},
        )

    def __add__(self, other: object) -> EvaluationSums:
        if not isinstance(other, EvaluationSums):
            return NotImplemented
        return EvaluationSums(
            devices=self.devices + other.devices,
            samples=self.samples + other.samples,
            metrics=add_metric_sums(self.metrics, other.metrics),
        )

    @classmethod
    def total(cls, parts: Iterable[EvaluationSums]) -> EvaluationSums:
        result = cls.zero()
        for part in parts:
            result = result + part
        return result

    def means(self) -> dict[str, float]:
        """Each metric's sum divided by its weight: the one division, done last ({} if empty)."""
        return {name: s.total / s.weight for name, s in self.metrics.items()}

    def to_json(self) -> dict[str, object]:
        """A plain-JSON form (for task results and S3 records); :meth:`from_json` reverses it."""
        return {
            "devices": self.devices,
            "samples": self.samples,
            "metrics": {name: [s.total, s.weight] for name, s in self.metrics.items()},
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, object]) -> EvaluationSums:
        raw = payload.get("metrics") or {}
        devices, samples = payload.get("devices", 0), payload.get("samples", 0)
        if (
            not isinstance(raw, Mapping)
            or not isinstance(devices, int)
            or not isinstance(samples, int)
        ):
            raise ValidationError(f"evaluation sums: malformed {dict(payload)!r}")
        metrics: dict[str, MetricSum] = {}
        for name, pair in raw.items():
            if not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValidationError(f"evaluation sums: metric {name!r} is not [sum, weight]")
            metrics[str(name)] = MetricSum(float(pair[0]), float(pair[1]))
        return cls(devices=devices, samples=samples, metrics=metrics)


@dataclass
class EvaluationCollector:
    """One leaf's evaluation reports for one task; feed it with :meth:`offer`.

    Parameters
    ----------
    task_id, model_version, selected
        What a report must answer: the leaf's evaluation task, the model it
        evaluates, the devices asked.
    metrics
        The metric names every report must carry, exactly (the job's metrics).
    max_samples
        The largest example count a device may claim (``None``: no cap).
    """

    task_id: str
    model_version: str
    selected: frozenset[str]
    metrics: tuple[str, ...]
    max_samples: int | None = None
    reported: set[str] = field(default_factory=set)
    rejected: Counter[str] = field(default_factory=Counter)
    rejection_examples: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0
    _sums: EvaluationSums = field(default_factory=EvaluationSums.zero, init=False, repr=False)

    def offer(
        self,
        *,
        device_id: str,
        task_id: str,
        model_version: str,
        num_samples: int,
        metrics: Mapping[str, float],
    ) -> str:
        """Take one report; return ``accepted``, ``duplicate`` or the rejection reason."""
        if device_id in self.reported:
            self.duplicates += 1
            return DUPLICATE
        reason, detail = self._refusal(device_id, task_id, model_version, num_samples, metrics)
        if reason is not None:
            self.rejected[reason] += 1
            self.rejection_examples.setdefault(reason, detail)
            return reason
        self._sums = self._sums + EvaluationSums.of_report(num_samples, metrics)
        self.reported.add(device_id)
        return ACCEPTED

    def _refusal(
        self,
        device_id: str,
        task_id: str,
        model_version: str,
        num_samples: int,
        metrics: Mapping[str, float],
    ) -> tuple[str | None, str]:
        reason, detail = task_refusal(
            device_id,
            task_id,
            model_version,
            selected=self.selected,
            expected_task=self.task_id,
            expected_version=self.model_version,
            did="evaluated",
            whose="the task's",
        )
        if reason is not None:
            return reason, detail
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            return "bad-weight", f"device {device_id} claims {num_samples!r} examples"
        if self.max_samples is not None and num_samples > self.max_samples:
            return "weight-cap", (
                f"device {device_id} claims {num_samples} examples, more than the task's "
                f"{self.max_samples}"
            )
        if set(metrics) != set(self.metrics):
            return "bad-metric", (
                f"device {device_id} reported metrics {sorted(metrics)}, the task asks for "
                f"{sorted(self.metrics)}"
            )
        for name, value in metrics.items():
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not math.isfinite(value):
                return "bad-metric", f"device {device_id} reported {name}={value!r}"
        return None, ""

    def result(self) -> EvaluationSums:
        """The sums of every accepted report (zero when none was)."""
        return self._sums
