"""A leaf node's intake: which device updates count, and their running sum.

Gateways already refuse malformed uploads, but the leaf is the last door before
the aggregate, and several stateless gateways may have written the same
device's update twice (a retry that reached another gateway). So the leaf
re-checks everything and keeps the first update per device: an update counts
only if its device was selected for this leaf, it answers the current task and
model version, and it passes :func:`aggregation.guards.check_update`. Every
refusal is counted by reason for the round's report; none reaches the sum.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from aggregation.accumulator import Accumulator
from aggregation.guards import GuardConfig, UpdateRejected, check_update
from aggregation.partial import PartialAggregate
from aggregation.tensors import TensorSpec

ACCEPTED = "accepted"
DUPLICATE = "duplicate"


@dataclass
class LeafCollector:
    """Running state of one leaf in one round; feed it updates with :meth:`offer`."""

    spec: Mapping[str, TensorSpec]
    task_id: str
    model_version: str
    selected: frozenset[str]
    guard: GuardConfig = field(default_factory=GuardConfig)
    reported: set[str] = field(default_factory=set)
    rejected: Counter[str] = field(default_factory=Counter)
    rejection_examples: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0
    bytes_in: int = 0
    _acc: Accumulator | None = None

    def offer(
        self,
        *,
        device_id: str,
        task_id: str,
        model_version: str,
        num_samples: int,
        tensors: Mapping[str, np.ndarray],
        metrics: Mapping[str, float],
    ) -> str:
        """Take one update; return ``accepted``, ``duplicate`` or the rejection reason."""
        if device_id in self.reported:
            self.duplicates += 1
            return DUPLICATE
        reason, detail = self._refusal(device_id, task_id, model_version)
        if reason is None:
            try:
                checked = check_update(
                    tensors,
                    spec=self.spec,
                    device_id=device_id,
                    weight=num_samples,
                    metrics=metrics,
                    config=self.guard,
                )
                if self._acc is None:
                    self._acc = Accumulator(self.spec)
                self._acc.add_checked(checked)
            except UpdateRejected as exc:
                reason, detail = exc.reason, str(exc)
        if reason is not None:
            self.rejected[reason] += 1
            self.rejection_examples.setdefault(reason, detail)
            return reason
        self.reported.add(device_id)
        return ACCEPTED

    def _refusal(self, device_id: str, task_id: str, model_version: str) -> tuple[str | None, str]:
        if device_id not in self.selected:
            return "not-selected", f"device {device_id} was not selected for task {self.task_id}"
        if task_id != self.task_id:
            return "wrong-task", f"device {device_id} answered task {task_id}, not {self.task_id}"
        if model_version != self.model_version:
            return "stale-model", (
                f"device {device_id} trained model {model_version[:12]}, "
                f"not the round's {self.model_version[:12]}"
            )
        return None, ""

    def result(self) -> PartialAggregate:
        """The leaf's partial aggregate (zero when nothing was accepted)."""
        return PartialAggregate.zero() if self._acc is None else self._acc.result()
