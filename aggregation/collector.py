"""A leaf node's intake: which device updates count, and their running sum.

Gateways already refuse malformed uploads, but the leaf is the last door before
the aggregate, and several stateless gateways may have written the same
device's update twice (a retry that reached another gateway). So the leaf
re-checks everything and keeps the first update per device: an update counts
only if its device was selected for this leaf, it answers the current task and
model version, and it passes :func:`aggregation.guards.check_update` (including
the task's cap on the sample count a device may claim). Every refusal is counted
by reason for the round's report; none reaches the sum.

Robust by default: unless the run sets an explicit ``max_norm``, every update is
clipped to the adaptive norm bound (``aggregation.clipping``): a multiple of the
median norm carried from the previous round, or, in round 0, of the median of
this leaf's first few updates, which are held back until that bound is known.
Clips are counted by reason too, and the partial carries the norm histogram from
which the root sets the next round's bound. In round 0, :meth:`LeafCollector.norm_summary`
tells the check across leaves (``AdaptiveNormBound.check_leaves``) what this
leaf's bound was set from, so a leaf whose updates are all (or mostly)
poisoned is bounded by the whole round's median.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from aggregation.accumulator import Accumulator
from aggregation.clipping import AdaptiveNormBound, LeafNorms, NormBoundState
from aggregation.guards import CheckedUpdate, GuardConfig, UpdateRejected, check_update, clip_to
from aggregation.norms import is_measurable
from aggregation.partial import PartialAggregate
from aggregation.tensors import TensorSpec

ACCEPTED = "accepted"
DUPLICATE = "duplicate"


def task_refusal(
    device_id: str,
    task_id: str,
    model_version: str,
    *,
    selected: frozenset[str],
    expected_task: str,
    expected_version: str,
    did: str,
    whose: str,
) -> tuple[str | None, str]:
    """Why a device's answer is not for this task (reason, detail), or ``(None, "")``.

    The checks every leaf intake makes before looking at a body, training or
    evaluation: the device was asked, answers this task, used this model.
    """
    if device_id not in selected:
        return "not-selected", f"device {device_id} was not selected for task {expected_task}"
    if task_id != expected_task:
        return "wrong-task", f"device {device_id} answered task {task_id}, not {expected_task}"
    if model_version != expected_version:
        return "stale-model", (
            f"device {device_id} {did} model {model_version[:12]}, "
            f"not {whose} {expected_version[:12]}"
        )
    return None, ""


@dataclass
class LeafCollector:
    """Running state of one leaf in one round; feed it updates with :meth:`offer`.

    Parameters
    ----------
    spec, task_id, model_version, selected
        What this leaf's task expects: the global model's tensors, the task and
        model it must answer, the devices asked.
    guard
        Spec checks always run; ``max_weight`` caps the claimed sample count
        (``weight-cap``) and ``max_norm``, when set, replaces the adaptive bound.
    norm_state
        The adaptive bound's state from the previous round's root (default:
        round 0, no estimate: the leaf warms up).
    adaptive
        The adaptive bound's policy, or ``None`` to sum without a norm bound
        (default: ``AdaptiveNormBound()``).
    """

    spec: Mapping[str, TensorSpec]
    task_id: str
    model_version: str
    selected: frozenset[str]
    guard: GuardConfig = field(default_factory=GuardConfig)
    norm_state: NormBoundState = field(default_factory=NormBoundState)
    adaptive: AdaptiveNormBound | None = field(default_factory=AdaptiveNormBound)
    reported: set[str] = field(default_factory=set)
    rejected: Counter[str] = field(default_factory=Counter)
    rejection_examples: dict[str, str] = field(default_factory=dict)
    clipped: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    bytes_in: int = 0
    _acc: Accumulator | None = None
    _policy: AdaptiveNormBound | None = field(default=None, init=False, repr=False)
    _bound: float | None = field(default=None, init=False, repr=False)
    _pending: list[CheckedUpdate] = field(default_factory=list, init=False, repr=False)
    _reference: float | None = field(default=None, init=False, repr=False)
    _largest: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        # An explicit max_norm overrides the adaptive bound (check_update applies it).
        self._policy = self.adaptive if self.guard.max_norm is None else None
        if self._policy is not None:
            self._bound = self._policy.bound(self.norm_state)

    @property
    def norm_bound(self) -> float | None:
        """The norm bound in force: explicit, adaptive, or None while warming up (or off)."""
        return self.guard.max_norm if self.guard.max_norm is not None else self._bound

    @property
    def warmup_reference(self) -> float | None:
        """Round 0: the norm the warm-up bound is a multiple of (None: no warm-up, or not yet)."""
        return self._reference

    @property
    def largest_norm(self) -> float:
        """The largest norm of an update as summed, after its clip (0 before any)."""
        return self._largest

    def norm_summary(self, partial: PartialAggregate) -> LeafNorms:
        """What round 0's check across leaves needs of this leaf, given its :meth:`result`."""
        return LeafNorms(norms=partial.norms, reference=self._reference, largest=self._largest)

    @property
    def waiting(self) -> int:
        """Accepted updates held back until round 0's warm-up fixes the bound."""
        return len(self._pending)

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
        """Take one update; return ``accepted``, ``duplicate`` or the rejection reason.

        "accepted" is final: an update held in the warm-up buffer is summed
        (clipped if need be) when the bound is fixed or at :meth:`result`.
        """
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
                self._admit(checked)
            except UpdateRejected as exc:
                reason, detail = exc.reason, str(exc)
        if reason is not None:
            self.rejected[reason] += 1
            self.rejection_examples.setdefault(reason, detail)
            return reason
        self.reported.add(device_id)
        return ACCEPTED

    def _refusal(self, device_id: str, task_id: str, model_version: str) -> tuple[str | None, str]:
        return task_refusal(
            device_id,
            task_id,
            model_version,
            selected=self.selected,
            expected_task=self.task_id,
            expected_version=self.model_version,
            did="trained",
            whose="the round's",
        )

    def _admit(self, checked: CheckedUpdate) -> None:
        """Sum a checked update under the bound in force, or hold it for the warm-up."""
        policy = self._policy
        if policy is None or not is_measurable(checked.norm):
            self._sum(checked)  # no adaptive bound, or a (near) zero update: nothing to clip
        elif self._bound is not None:
            self._sum(clip_to(checked, self._bound, "adaptive-norm"))
        else:
            self._pending.append(checked)
            if len(self._pending) >= policy.warmup:
                self._end_warmup(policy)

    def _end_warmup(self, policy: AdaptiveNormBound) -> None:
        """Fix round 0's bound from the held updates, then sum them under it."""
        pending, self._pending = self._pending, []
        self._reference = policy.warmup_reference(c.norm for c in pending)
        bound = None if self._reference is None else policy.multiplier * self._reference
        self._bound = bound
        for checked in pending:  # all measurable, so bound is not None
            self._sum(checked if bound is None else clip_to(checked, bound, "adaptive-norm"))

    def _sum(self, checked: CheckedUpdate) -> None:
        if self._acc is None:
            self._acc = Accumulator(self.spec)
        self._acc.add_checked(checked)
        self._largest = max(self._largest, checked.norm * checked.scale)
        if checked.clip_reason is not None:
            self.clipped[checked.clip_reason] += 1

    def result(self) -> PartialAggregate:
        """The leaf's partial aggregate (zero when nothing was accepted).

        Updates still held by the warm-up (a leaf that got fewer than
        ``adaptive.warmup``) are summed first, under a bound from what it has.
        """
        if self._pending and self._policy is not None:
            self._end_warmup(self._policy)
        return PartialAggregate.zero() if self._acc is None else self._acc.result()
