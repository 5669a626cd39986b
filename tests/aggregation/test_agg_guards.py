"""Guards: every bad update is refused with a reason code, and never touches the sum."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from aggregation.accumulator import Accumulator
from aggregation.guards import (
    CLIP_REASONS,
    REJECT_REASONS,
    CheckedUpdate,
    GuardConfig,
    UpdateRejected,
    check_update,
    clip_to,
)
from aggregation.tensors import TensorDict, TensorSpec, spec_of
from infra.errors import ConfigError, ValidationError

SPEC = {
    "conv.weight": TensorSpec((4, 3), "float32"),
    "conv.bias": TensorSpec((4,), "float32"),
}


def good_update() -> TensorDict:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(s.shape).astype(s.dtype) for name, s in SPEC.items()}


def rejection(update: TensorDict, **kwargs: object) -> UpdateRejected:
    """Run the guard expecting a rejection from device 'phone-42'; return it."""
    params: dict[str, object] = {"device_id": "phone-42", "weight": 10, **kwargs}
    with pytest.raises(UpdateRejected) as info:
        check_update(update, spec=SPEC, **params)  # type: ignore[arg-type]
    assert info.value.reason in REJECT_REASONS
    assert info.value.device_id == "phone-42"
    assert "phone-42" in str(info.value)
    return info.value


def test_good_update_passes_unchanged() -> None:
    update = good_update()

    checked = check_update(update, spec=SPEC, device_id="phone-1", weight=32, metrics={"loss": 0.4})

    assert isinstance(checked, CheckedUpdate)
    assert checked.tensors is update
    assert checked.weight == 32.0 and checked.metrics == {"loss": 0.4}
    assert checked.scale == 1.0 and not checked.clipped
    expected = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in update.values()))
    assert checked.norm == pytest.approx(expected, rel=1e-6)


def test_missing_tensor_is_named() -> None:
    update = good_update()
    del update["conv.bias"]

    err = rejection(update)

    assert (err.reason, err.tensor) == ("missing-tensor", "conv.bias")
    assert "'conv.bias'" in str(err)


def test_unknown_tensor_is_named() -> None:
    update = {**good_update(), "backdoor.weight": np.zeros(3, np.float32)}

    err = rejection(update)

    assert (err.reason, err.tensor) == ("unknown-tensor", "backdoor.weight")
    assert "backdoor.weight" in str(err)


def test_missing_and_unknown_are_both_reported() -> None:
    update = good_update()
    update["conv.bias2"] = update.pop("conv.bias")

    err = rejection(update)

    assert err.reason == "missing-tensor"
    assert "conv.bias2" in str(err)


def test_wrong_shape() -> None:
    update = {**good_update(), "conv.weight": np.zeros((3, 4), np.float32)}

    err = rejection(update)

    assert (err.reason, err.tensor) == ("shape", "conv.weight")
    assert "(3, 4), expected (4, 3)" in str(err)


def test_wrong_dtype() -> None:
    update = {**good_update(), "conv.bias": np.zeros(4, np.float64)}

    err = rejection(update)

    assert (err.reason, err.tensor) == ("dtype", "conv.bias")
    assert "float64, expected float32" in str(err)


def test_not_an_array_is_a_dtype_rejection() -> None:
    update: dict[str, object] = {**good_update(), "conv.bias": [0.0, 0.0, 0.0, 0.0]}

    err = rejection(update)  # type: ignore[arg-type]

    assert (err.reason, err.tensor) == ("dtype", "conv.bias")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(bad: float) -> None:
    update = good_update()
    update["conv.weight"][2, 1] = bad

    err = rejection(update)

    assert (err.reason, err.tensor) == ("non-finite", "conv.weight")
    assert "1 NaN or infinite values" in str(err)


def test_huge_but_finite_values_are_not_non_finite() -> None:
    # float32 squares of 1e30 overflow; the guard must fall back, not call them NaN.
    update = {name: np.full(s.shape, 1e30, np.float32) for name, s in SPEC.items()}

    checked = check_update(update, spec=SPEC, device_id="d", weight=1)

    assert checked.norm == pytest.approx(1e30 * math.sqrt(16), rel=1e-6)


@pytest.mark.parametrize("weight", [0, -5, float("nan"), float("inf"), "12", None, True])
def test_bad_weight(weight: object) -> None:
    err = rejection(good_update(), weight=weight)

    assert (err.reason, err.tensor) == ("bad-weight", None)
    assert "sample count" in str(err)


def test_bad_metric() -> None:
    err = rejection(good_update(), metrics={"loss": float("nan")})

    assert (err.reason, err.tensor) == ("bad-metric", None)
    assert "'loss'" in str(err)


class TestNormBound:
    def scaled_update(self, target_norm: float) -> TensorDict:
        update = good_update()
        norm = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in update.values()))
        return {k: (v * (target_norm / norm)).astype(np.float32) for k, v in update.items()}

    def test_clip_scales_down_to_the_bound(self) -> None:
        # Prepare
        update = self.scaled_update(10.0)
        config = GuardConfig(max_norm=2.0, on_norm_exceeded="clip")

        # Execute
        checked = check_update(update, spec=SPEC, device_id="d", weight=1, config=config)
        clipped = checked.scaled_tensors()

        # Assert
        assert checked.clipped
        assert checked.scale == pytest.approx(0.2, rel=1e-6)
        assert checked.norm == pytest.approx(10.0, rel=1e-6)
        clipped_norm = math.sqrt(
            sum(float(np.sum(a.astype(np.float64) ** 2)) for a in clipped.values())
        )
        assert clipped_norm == pytest.approx(2.0, rel=1e-6)
        assert all(a.dtype == np.float32 for a in clipped.values())

    def test_reject_refuses_instead(self) -> None:
        config = GuardConfig(max_norm=2.0, on_norm_exceeded="reject")

        err = rejection(self.scaled_update(10.0), config=config)

        assert (err.reason, err.tensor) == ("norm-bound", None)
        assert "exceeds 2" in str(err)

    def test_within_bound_is_untouched_in_both_modes(self) -> None:
        update = self.scaled_update(1.5)
        for mode in ("clip", "reject"):
            config = GuardConfig(max_norm=2.0, on_norm_exceeded=mode)  # type: ignore[arg-type]

            checked = check_update(update, spec=SPEC, device_id="d", weight=1, config=config)

            assert (
                checked.scale == 1.0
                and checked.scaled_tensors()["conv.bias"] is update["conv.bias"]
            )

    def test_clipped_update_sums_as_clipped(self) -> None:
        update = self.scaled_update(10.0)
        config = GuardConfig(max_norm=2.0)
        acc = Accumulator(SPEC)

        acc.add_checked(check_update(update, spec=SPEC, device_id="d", weight=3, config=config))
        partial = acc.result()

        assert partial.weight == 3.0
        for name, arr in update.items():
            np.testing.assert_allclose(partial.sums[name], 3 * 0.2 * arr, rtol=1e-5, atol=1e-7)

    @pytest.mark.parametrize(
        "kwargs",
        [{"max_norm": 0.0}, {"max_norm": -1.0}, {"max_norm": math.inf}, {"on_norm_exceeded": "x"}],
    )
    def test_bad_config(self, kwargs: dict[str, object]) -> None:
        with pytest.raises(ConfigError):
            GuardConfig(**kwargs)  # type: ignore[arg-type]


def test_rejected_update_never_touches_the_sum() -> None:
    # Prepare
    acc = Accumulator(spec_of(good_update()))
    good = good_update()
    poisoned = good_update()
    poisoned["conv.bias"][0] = np.nan

    # Execute
    acc.add_checked(check_update(good, spec=SPEC, device_id="ok", weight=2))
    with pytest.raises(UpdateRejected):
        acc.add_checked(check_update(poisoned, spec=SPEC, device_id="bad", weight=2))
    partial = acc.result()

    # Assert
    assert partial.count == 1 and partial.weight == 2.0
    assert all(np.isfinite(s).all() for s in partial.sums.values())


def test_rejection_is_a_validation_error_and_pickles() -> None:
    update = {**good_update(), "conv.bias": np.zeros(5, np.float32)}
    err = rejection(update)

    clone = pickle.loads(pickle.dumps(err))

    assert isinstance(err, ValidationError)
    assert (clone.device_id, clone.tensor, clone.reason) == ("phone-42", "conv.bias", "shape")
    assert str(clone) == str(err)


class TestWeightCap:
    def test_a_claim_above_the_tasks_cap_is_refused_with_its_own_reason(self) -> None:
        config = GuardConfig(max_weight=500)

        err = rejection(good_update(), weight=1_000_000_000, config=config)

        assert (err.reason, err.tensor) == ("weight-cap", None)
        assert "claims 1e+09 samples, more than the 500" in str(err)

    def test_claims_up_to_the_cap_pass(self) -> None:
        config = GuardConfig(max_weight=500)

        checked = check_update(good_update(), spec=SPEC, device_id="d", weight=500, config=config)

        assert checked.weight == 500.0

    def test_bad_weight_is_still_bad_weight_under_a_cap(self) -> None:
        err = rejection(good_update(), weight=float("nan"), config=GuardConfig(max_weight=5))

        assert err.reason == "bad-weight"

    @pytest.mark.parametrize("cap", [0.0, -3.0, math.inf, math.nan])
    def test_bad_cap(self, cap: float) -> None:
        with pytest.raises(ConfigError, match="max_weight"):
            GuardConfig(max_weight=cap)


class TestClipTo:
    def test_clip_reason_names_the_bound_that_clipped(self) -> None:
        update = {name: np.full(s.shape, 3.0, np.float32) for name, s in SPEC.items()}  # norm 12
        explicit = check_update(
            update, spec=SPEC, device_id="d", weight=1, config=GuardConfig(max_norm=6.0)
        )
        plain = check_update(update, spec=SPEC, device_id="d", weight=1)

        adaptive = clip_to(plain, 3.0, "adaptive-norm")

        assert explicit.scale == pytest.approx(0.5) and explicit.clip_reason == "norm-bound"
        assert adaptive.scale == pytest.approx(0.25) and adaptive.clip_reason == "adaptive-norm"
        assert adaptive.norm == plain.norm == pytest.approx(12.0)  # the norm as sent
        assert plain.clip_reason is None and {"norm-bound", "adaptive-norm"} == CLIP_REASONS

    def test_within_the_bound_returns_the_same_object(self) -> None:
        checked = check_update(good_update(), spec=SPEC, device_id="d", weight=1)

        assert clip_to(checked, checked.norm, "adaptive-norm") is checked

    def test_a_tighter_bound_wins_and_a_looser_one_changes_nothing(self) -> None:
        update = {name: np.full(s.shape, 3.0, np.float32) for name, s in SPEC.items()}
        clipped = check_update(
            update, spec=SPEC, device_id="d", weight=1, config=GuardConfig(max_norm=6.0)
        )

        assert clip_to(clipped, 8.0, "adaptive-norm") is clipped
        assert clip_to(clipped, 1.2, "adaptive-norm").scale == pytest.approx(0.1)

    @pytest.mark.parametrize("bound", [0.0, -1.0, math.inf, math.nan])
    def test_bad_bound(self, bound: float) -> None:
        checked = check_update(good_update(), spec=SPEC, device_id="d", weight=1)

        with pytest.raises(ConfigError, match="norm bound"):
            clip_to(checked, bound, "adaptive-norm")


def test_a_float64_update_whose_norm_overflows_is_non_finite() -> None:
    spec = {"w": TensorSpec((4,), "float64")}
    update = {"w": np.full(4, 1e308, np.float64)}

    with pytest.raises(UpdateRejected) as info:
        check_update(update, spec=spec, device_id="d", weight=1)

    assert info.value.reason == "non-finite"
    assert "overflows float64" in str(info.value)
