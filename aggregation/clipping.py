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
lower median, sums them under it and streams the rest; a leaf that closes with
fewer uses what it has. The lower median means one outsized update among
honest ones is never the reference, even with two updates. A leaf whose only
update is the poisoned one cannot tell it apart; from round 1 on every leaf
starts from the carried bound. (The warm-up bound, unlike the carried one,
depends on which updates arrive first.)

The adaptive bound *clips* rather than rejects: clipping already bounds the
damage; rejecting would throw away data-rich honest devices, whose larger
norms come from more local work, and bias the model against them; and a clip
is decided the moment an update is offered, so ``LeafCollector.offer`` can
answer "accepted" even for an update waiting in the warm-up buffer. An explicit
``GuardConfig.max_norm`` overrides the adaptive bound (and may reject).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from aggregation.norms import NormHistogram, is_measurable
from infra.errors import ConfigError


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

    def warmup_bound(self, norms: Iterable[float]) -> float | None:
        """Round 0's bound from a leaf's first norms: ``multiplier`` x their lower quantile.

        Only measurable norms count (zero updates say nothing about scale);
        None if there are none.
        """
        ordered = sorted(n for n in norms if is_measurable(n))
        if not ordered:
            return None
        rank = max(1, math.ceil(self.quantile * len(ordered)))
        return self.multiplier * ordered[rank - 1]

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
