"""Norm histograms (bins, quantiles, wire forms) and the adaptive bound's pure policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation.clipping import AdaptiveNormBound, LeafNorms, LeafScale, NormBoundState
from aggregation.norms import (
    NUM_BINS,
    OVERFLOW_BIN,
    UNDERFLOW_BIN,
    NormHistogram,
    bin_ceiling,
    bin_centre,
    norm_bin,
)
from infra.errors import ConfigError, ValidationError

norms = st.floats(min_value=0.0, max_value=1e35, allow_nan=False, allow_infinity=False)


class TestBins:
    @settings(max_examples=200, deadline=None)
    @given(norm=st.floats(min_value=1e-19, max_value=1e19))
    def test_a_norm_is_within_a_quarter_octave_of_its_bin_centre(self, norm: float) -> None:
        centre = bin_centre(norm_bin(norm))

        assert 2**-0.125 <= norm / centre < 2**0.125 * (1 + 1e-12)

    def test_edges_and_extremes(self) -> None:
        assert norm_bin(0.0) == UNDERFLOW_BIN == norm_bin(1e-30)
        assert norm_bin(7e30) == OVERFLOW_BIN == NUM_BINS - 1
        assert norm_bin(1.0) == norm_bin(1.18) != norm_bin(1.19)  # 2**0.25 = 1.189...
        assert norm_bin(2.0) == norm_bin(1.0) + 4  # four bins per octave
        assert bin_centre(UNDERFLOW_BIN) == 0.0

    @settings(max_examples=200, deadline=None)
    @given(norm=st.floats(min_value=0.0, max_value=1e35))
    def test_a_norm_is_below_its_bin_ceiling_and_within_a_quarter_octave_of_it(
        self, norm: float
    ) -> None:
        index = norm_bin(norm)
        ceiling = bin_ceiling(index)

        assert norm < ceiling
        if index not in (UNDERFLOW_BIN, OVERFLOW_BIN):
            assert ceiling <= norm * 2**0.25
            assert norm_bin(ceiling) == index + 1  # the ceiling opens the next bin
        assert bin_ceiling(OVERFLOW_BIN) == math.inf

    @settings(max_examples=100, deadline=None)
    @given(a=norms, b=norms)
    def test_bins_are_monotonic(self, a: float, b: float) -> None:
        if a <= b:
            assert norm_bin(a) <= norm_bin(b)


class TestHistogram:
    def test_quantile_is_the_lower_median_of_measurable_norms(self) -> None:
        hist = NormHistogram.of([0.0, 1.0, 1000.0])  # zero says nothing about scale

        assert hist.total == 3
        assert hist.quantile(0.5) == pytest.approx(1.0, rel=0.1)
        assert NormHistogram.of([0.0]).quantile(0.5) is None
        assert NormHistogram.zero().quantile(0.5) is None

    @settings(max_examples=100, deadline=None)
    @given(values=st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=40), q=st.floats(0.05, 0.95))
    def test_quantile_matches_the_sorted_rank_within_bin_precision(
        self, values: list[float], q: float
    ) -> None:
        exact = sorted(values)[max(1, math.ceil(q * len(values))) - 1]

        got = NormHistogram.of(values).quantile(q)

        assert got is not None
        assert 2**-0.125 <= exact / got <= 2**0.125 * (1 + 1e-12)

    @settings(max_examples=100, deadline=None)
    @given(values=st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=40), q=st.floats(0.05, 0.95))
    def test_quantile_ceiling_is_never_below_the_sorted_rank(
        self, values: list[float], q: float
    ) -> None:
        exact = sorted(values)[max(1, math.ceil(q * len(values))) - 1]

        got = NormHistogram.of(values).quantile_ceiling(q)

        assert got is not None and exact < got <= exact * 2**0.25
        assert NormHistogram.of([0.0, 0.0]).quantile_ceiling(q) is None
        assert NormHistogram.of([0.0, 3.0]).measurable == 1

    @settings(max_examples=100, deadline=None)
    @given(parts=st.lists(st.lists(norms, max_size=8), min_size=1, max_size=5))
    def test_adding_histograms_is_histogramming_everything(self, parts: list[list[float]]) -> None:
        hists = [NormHistogram.of(p) for p in parts]
        total = NormHistogram.zero()
        for h in hists:
            total = total + h

        assert total == NormHistogram.of([n for p in parts for n in p])
        assert sum(reversed(hists), NormHistogram.zero()) == total  # commutative, exactly
        assert total + NormHistogram.zero() == total == NormHistogram.zero() + total

    def test_json_and_vector_round_trips(self) -> None:
        hist = NormHistogram.of([0.0, 0.3, 0.3, 2.0, 7e30])

        assert NormHistogram.from_json(hist.to_json(), source="s") == hist
        vector = hist.to_vector()
        assert vector.shape == (NUM_BINS,) and vector.sum() == 5
        assert NormHistogram.from_vector(vector + vector) == hist + hist

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            ([1, 2], "must be an object"),
            ({"x": 1}, "is not an index"),
            ({"-1": 1}, "is not an index"),
            ({"9999": 1}, "not in"),
            ({"3": -1}, "must be an int >= 0"),
            ({"3": 1.5}, "must be an int >= 0"),
            ({"3": True}, "must be an int >= 0"),
        ],
    )
    def test_malformed_json_is_refused(self, data: object, message: str) -> None:
        with pytest.raises(ValidationError, match=message):
            NormHistogram.from_json(data, source="s3://x")

    def test_bad_vectors_and_norms_are_refused(self) -> None:
        with pytest.raises(ValidationError, match="shape"):
            NormHistogram.from_vector(np.zeros(3))
        with pytest.raises(ValidationError, match="integer counts"):
            NormHistogram.from_vector(np.full(NUM_BINS, 0.5))
        with pytest.raises(ValidationError, match="finite and >= 0"):
            NormHistogram.of([math.inf])
        with pytest.raises(ValidationError, match="quantile"):
            NormHistogram.of([1.0]).quantile(1.0)


class TestPolicy:
    def test_round_zero_has_no_bound_and_warms_up_on_the_lower_median(self) -> None:
        policy = AdaptiveNormBound()

        assert policy.bound(NormBoundState()) is None
        assert policy.warmup_bound([1.0, 1000.0]) == 4.0  # the smaller of two decides
        assert policy.warmup_bound([3.0, 1.0, 2.0, 1e30, 0.0]) == 8.0
        assert policy.warmup_bound([0.0, 0.0]) is None

    def test_the_estimate_follows_the_median_at_most_twofold_per_round(self) -> None:
        policy = AdaptiveNormBound()
        first = policy.next_state(NormBoundState(), NormHistogram.of([1.0, 1.0, 50.0]))

        estimate = first.estimate
        assert first.rounds == 1 and estimate is not None
        assert estimate == pytest.approx(1.0, rel=0.1)
        assert policy.bound(first) == pytest.approx(4 * estimate)
        # an attacker-dominated round can only double it
        jumped = policy.next_state(first, NormHistogram.of([1e30] * 10))
        assert jumped.estimate == pytest.approx(2 * estimate)
        fell = policy.next_state(first, NormHistogram.of([1e-6] * 10))
        assert fell.estimate == pytest.approx(estimate / 2)
        # a round with no measurable norm keeps the state
        assert policy.next_state(first, NormHistogram.of([0.0])) is first
        assert policy.next_state(first, NormHistogram.zero()) is first

    def test_round_zero_check_scales_a_leaf_calibrated_by_outsized_updates(self) -> None:
        policy = AdaptiveNormBound()
        honest = NormHistogram.of([1.0, 1.5, 2.0, 2.5, 3.0])
        leaves = {
            "a": LeafNorms(honest, reference=2.0, largest=3.0),
            "b": LeafNorms(NormHistogram.of([1.2, 1.4]), reference=1.2, largest=1.4),
            "lone": LeafNorms(NormHistogram.of([1e6]), reference=1e6, largest=1e6),
        }
        bound = policy.round_bound(honest + leaves["b"].norms + leaves["lone"].norms)
        assert bound is not None and 4 * 1.5 < bound <= 4 * 1.5 * 2**0.25  # lower median: 1.5

        scales = policy.check_leaves(leaves)

        assert scales == {"lone": LeafScale(factor=bound / 1e6, bound=bound, updates=1)}

    def test_round_zero_check_leaves_honest_and_carried_rounds_alone(self) -> None:
        policy = AdaptiveNormBound()
        poison = NormHistogram.of([1e6])
        # an outsized leaf whose bound was carried (no warm-up reference) is not judged
        carried = {"a": LeafNorms(NormHistogram.of([1.0]), reference=None, largest=1.0)}
        carried["p"] = LeafNorms(poison, reference=None, largest=4.0)
        assert policy.check_leaves(carried) == {}
        # a leaf with an honest reference whose poison its own bound already clipped
        mixed = {
            "a": LeafNorms(NormHistogram.of([1.0, 1.1, 1.2]), reference=1.1, largest=1.2),
            "p": LeafNorms(NormHistogram.of([1.0, 1e6]), reference=1.0, largest=4.0),
        }
        assert policy.check_leaves(mixed) == {}
        # nothing measurable, or a median beyond the histogram's range: no bound to read
        assert policy.check_leaves({}) == {}
        assert policy.check_leaves({"z": LeafNorms(NormHistogram.of([0.0]), None, 0.0)}) == {}
        huge = LeafNorms(NormHistogram.of([1e30, 1e30]), reference=1e30, largest=1e30)
        assert policy.round_bound(huge.norms) is None and policy.check_leaves({"h": huge}) == {}
        with pytest.raises(ValidationError, match="largest"):
            LeafNorms(poison, reference=1.0, largest=math.nan)

    def test_state_is_small_json(self) -> None:
        state = NormBoundState(estimate=0.25, rounds=3)

        dumped = state.model_dump(mode="json")

        assert dumped == {"estimate": 0.25, "rounds": 3}
        assert NormBoundState.model_validate(dumped) == state
        with pytest.raises(ValueError, match="estimate"):
            NormBoundState.model_validate({"estimate": -1.0})
        with pytest.raises(ValueError, match="estimate"):
            NormBoundState.model_validate({"estimate": math.inf})

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"multiplier": 0.5},
            {"multiplier": math.inf},
            {"quantile": 0.0},
            {"quantile": 1.0},
            {"max_change": 1.0},
            {"warmup": 0},
            {"warmup": True},
        ],
    )
    def test_bad_policy_is_a_config_error(self, kwargs: dict[str, object]) -> None:
        with pytest.raises(ConfigError):
            AdaptiveNormBound(**kwargs)  # type: ignore[arg-type]
