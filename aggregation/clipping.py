"""The default update-norm bound: a multiple of the typical norm, learned, with no tuning.

Why a bound at all. A mean is only as robust as its worst term: one device
sending 1000x the honest norm (or a finite 7e30) moves the sample-weighted mean
by its weight share times that norm, and decides the global model. Clipping each
update's L2 norm to ``C`` caps any single device's pull on the mean at
``w_i / W * C`` (plus its share of the honest mean), whatever it sends.

Why this bound. A fixed ``C`` has to be tuned per model and drifts out of date
as update norms shrink during training. Andrew et al. 2021, "Differentially
Private Learning with Adaptive Clipping" (https://arxiv.org/abs/1905.03871),
instead track a quantile of the norms from round to round, ``C <- C * exp(-eta *
(b - gamma))`` with ``b`` the fraction of updates under ``C``; a quantile is
robust because one device moves it by at most one rank. We keep the idea (a
quantile, carried between rounds, moved by a bounded factor per round) but,
having no privacy budget to spend on the count, measure the quantile directly:
every partial carries a :class:`~aggregation.norms.NormHistogram` of the norms it
summed, and the root reads the median of the whole round from the sum. So:

* ``estimate`` (the state) is the median norm of the last round, moved by at
  most a factor ``max_change`` (2) per round: a round dominated by attackers
  can double it, not set it to 1e30, while honest training that shrinks or
  grows its updates is followed within a few rounds;
* the bound is ``multiplier * estimate`` (4x the median). Honest norms in a
  round rarely spread that far (local work differs by device, but steps are
  capped per round), so honest updates are essentially never clipped, while a
  1000x update keeps at most 4/1000 of its length.

Round 0 has no estimate. Each leaf then buffers its first ``warmup`` (5)
updates with a measurable norm, sets its bound to ``multiplier`` times their
lower median (the leaf's *reference*), sums them under it and streams the
rest; a leaf that closes with fewer uses what it has. The lower median means
one outsized update among honest ones is never the reference, even with two
updates. (The warm-up bound, unlike the carried one, depends on which updates
arrive first.) From round 1 on every leaf starts from the carried bound.

A leaf alone cannot judge an update it has nothing to compare with: its only
update, or a warm-up that is mostly poison, becomes its own reference. So
round 0 ends with a check across leaves (:meth:`AdaptiveNormBound.check_leaves`),
run once every leaf has finished and before any node adds partials. Each leaf
reports a :class:`LeafNorms` (its partial's histogram, its reference, the
largest norm it summed); the round's bound is ``multiplier`` times the round's
median, read from the sum of all the leaves' histograms, rounded *up* to its
bin's top edge (:meth:`NormHistogram.quantile_ceiling`; the bin's centre may
be 9% below the true median, which would catch honest norms spread almost
``multiplier`` apart). A leaf whose reference exceeds that bound was
calibrated by outsized updates, since an honest reference lies within
``multiplier`` of the round's median. Judging the reference, rather than
asking whether *all* of a leaf's updates lie above the bound, also catches a
warm-up that is mostly (not only) poison, and leaves alone a leaf whose
honest majority set its bound (its poison is already clipped to a multiple
of an honest norm). Its partial is then scaled as a whole by ``bound / largest``
(:meth:`PartialAggregate.scaled <aggregation.partial.PartialAggregate.scaled>`),
so none of its updates pulls harder than the round's bound: exactly the clip
of a lone update, and conservative for several (the smaller ones shrink by
the same factor, honest ones in a mostly poisoned leaf included). Each such
leaf counts its measurable updates under the clip reason
``adaptive-norm-round``.

Why there, and not at the root. The decision needs the whole round's median
*and* each leaf's partial on its own. The root has the first but not the
second once aggregator levels have added leaves together (a sum of histograms
no longer says which leaf an outsized norm came from, and a sum of tensors
cannot be partly unscaled), and an aggregator node just above the leaves has
the second but not the first. Right after the leaf level the flow has both:
the leaves' summaries are a few hundred bytes each, and only an outsized
leaf's partial is read and rewritten (once per run, in round 0). Every level
above then just adds, so the fix holds for any tree depth and the partial sum
stays a plain monoid sum of leaf partials. An honest round is untouched: with
honest norms within ``multiplier`` of each other no reference exceeds the
round's bound, the check returns nothing, and nothing is read or written.
Still out of reach: a round whose median itself is poisoned (half the round
hostile), or a round with a single update.

The adaptive bound *clips* rather than rejects: clipping already bounds the
damage; rejecting would throw away data-rich honest devices, whose larger
norms come from more local work, and bias the model against them; and a clip
is decided the moment an update is offered, so ``LeafCollector.offer`` can
answer "accepted" even for an update waiting in the warm-up buffer. An explicit
``GuardConfig.max_norm`` overrides the adaptive bound (and may reject).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from aggregation.norms import NormHistogram, is_measurable
from infra.errors import ConfigError, ValidationError

ROUND_CLIP_REASON: Final = "adaptive-norm-round"
"""Clip reason of updates scaled by round 0's check across leaves."""

K = TypeVar("K")


class NormBoundState(BaseModel):
    """What the adaptive bound carries from one round to the next: a few bytes of JSON.

    Store ``model_dump(mode="json")`` with the run's commit and rebuild it with
    ``NormBoundState.model_validate``; the default (no estimate) is round 0.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    estimate: float | None = Field(
        default=None,
        gt=0.0,
        allow_inf_nan=False,
        description="Estimated median L2 norm of honest updates (None before the first round).",
    )
    rounds: int = Field(default=0, ge=0, description="Rounds whose norms shaped the estimate.")


@dataclass(frozen=True)
class AdaptiveNormBound:
    """The policy: pure functions from norms and state to a bound and the next state.

    Parameters
    ----------
    multiplier
        The bound is this many times the estimated quantile (default: 4).
    quantile
        Which quantile of the norms is estimated (default: 0.5, the median,
        robust until half the cohort is hostile).
    max_change
        Most the estimate may grow or shrink in one round, as a factor (default: 2).
    warmup
        Updates a leaf buffers in round 0 before fixing its bound (default: 5).
        Costs that many updates' memory, once per run.
    """

    multiplier: float = 4.0
    quantile: float = 0.5
    max_change: float = 2.0
    warmup: int = 5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1.0):
            raise ConfigError(f"multiplier must be a finite number >= 1, got {self.multiplier!r}")
        if not 0.0 < self.quantile < 1.0:
            raise ConfigError(f"quantile must be in (0, 1), got {self.quantile!r}")
        if not (math.isfinite(self.max_change) and self.max_change > 1.0):
            raise ConfigError(f"max_change must be a finite number > 1, got {self.max_change!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 1:
            raise ConfigError(f"warmup must be an int >= 1, got {self.warmup!r}")

    def bound(self, state: NormBoundState) -> float | None:
        """The bound for a round that starts from ``state`` (None: round 0, warm up)."""
        return None if state.estimate is None else self.multiplier * state.estimate

    def warmup_reference(self, norms: Iterable[float]) -> float | None:
        """The norm round 0's leaf bound is a multiple of: the lower quantile of its first norms.

        Only measurable norms count (zero updates say nothing about scale);
        None if there are none.
        """
        ordered = sorted(n for n in norms if is_measurable(n))
        if not ordered:
            return None
        rank = max(1, math.ceil(self.quantile * len(ordered)))
        return ordered[rank - 1]

    def warmup_bound(self, norms: Iterable[float]) -> float | None:
        """Round 0's bound from a leaf's first norms: ``multiplier`` x their lower quantile."""
        reference = self.warmup_reference(norms)
        return None if reference is None else self.multiplier * reference

    def round_bound(self, norms: NormHistogram) -> float | None:
        """``multiplier`` x the round's quantile, rounded up to its bin's top edge.

        Never below ``multiplier`` x the exact quantile, at most 19% above it.
        None when the round has no measurable norm, or its quantile is beyond
        the histogram's range (no finite bound can be read from it).
        """
        ceiling = norms.quantile_ceiling(self.quantile)
        if ceiling is None or not math.isfinite(ceiling):
            return None
        return self.multiplier * ceiling

    def check_leaves(self, leaves: Mapping[K, LeafNorms]) -> dict[K, LeafScale]:
        """Round 0's check across leaves: the leaves to scale down, and by how much.

        A leaf is outsized when its warm-up reference exceeds the round's bound
        (:meth:`round_bound` of the sum of every leaf's histogram) and so does
        the largest norm it summed; it is scaled by ``bound / largest``. Leaves
        that did not warm up (a carried or explicit bound) are never outsized,
        so from round 1 on this returns nothing. Pure and cheap: call it with
        every leaf of the round, after the last one finished.
        """
        total = NormHistogram.zero()
        for summary in leaves.values():
            total = total + summary.norms
        bound = self.round_bound(total)
        if bound is None:
            return {}
        out: dict[K, LeafScale] = {}
        for key, summary in leaves.items():
            ref = summary.reference
            if ref is not None and ref > bound and summary.largest > bound:
                out[key] = LeafScale(
                    factor=bound / summary.largest,
                    bound=bound,
                    updates=summary.norms.measurable,
                )
        return out

    def next_state(self, state: NormBoundState, norms: NormHistogram) -> NormBoundState:
        """The state for the next round, from this one's and the root's norm histogram.

        A round with no measurable norms (abandoned, or all-zero updates) leaves
        the state unchanged.
        """
        measured = norms.quantile(self.quantile)
        if measured is None:
            return state
        if state.estimate is not None:
            low, high = state.estimate / self.max_change, state.estimate * self.max_change
            measured = min(max(measured, low), high)
        return NormBoundState(estimate=measured, rounds=state.rounds + 1)


@dataclass(frozen=True)
class LeafNorms:
    """What round 0's check across leaves knows of one leaf: three small facts.

    Parameters
    ----------
    norms
        The histogram of the norms the leaf summed, as sent (its partial's ``norms``).
    reference
        The norm the leaf's warm-up bound is a multiple of
        (:meth:`AdaptiveNormBound.warmup_reference`), or None if the leaf did
        not warm up (a carried or explicit bound, no adaptive bound, nothing
        measurable).
    largest
        The largest norm of an update as the leaf summed it (after its own
        clip); 0 if none.
    """

    norms: NormHistogram
    reference: float | None
    largest: float

    def __post_init__(self) -> None:
        if not isinstance(self.norms, NormHistogram):
            raise ValidationError(f"norms must be a NormHistogram, got {self.norms!r}")
        for what, value in (("reference", self.reference), ("largest", self.largest)):
            if value is not None and not (math.isfinite(value) and value >= 0.0):
                raise ValidationError(f"{what} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class LeafScale:
    """Round 0's verdict on an outsized leaf: multiply its partial's sums by ``factor``.

    ``bound`` is the round's bound, ``updates`` the measurable updates the
    factor shrinks (counted under :data:`ROUND_CLIP_REASON`).
    """

    factor: float
    bound: float
    updates: int
