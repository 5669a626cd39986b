"""PartialAggregate: construction, the monoid laws, the one division, and both wire forms."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from aggregation.norms import NUM_BINS, NormHistogram
from aggregation.partial import (
    META_KEY,
    EmptyAggregate,
    InconsistentPartials,
    MetricSum,
    PartialAggregate,
)
from aggregation.tensors import TensorSpec, decode_tensors, encode_tensors
from infra.errors import ValidationError


def make_update(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.standard_normal((3, 4)) * scale).astype(np.float32),
        "b": (rng.standard_normal(4) * scale).astype(np.float32),
    }


class TestFromUpdate:
    def test_holds_weighted_sums_in_float64(self) -> None:
        # Prepare
        update = make_update(0)

        # Execute
        partial = PartialAggregate.from_update(update, weight=3, metrics={"loss": 0.5})

        # Assert
        assert partial.count == 1
        assert partial.weight == 3.0
        assert partial.sums["w"].dtype == np.float64
        np.testing.assert_array_equal(partial.sums["w"], update["w"].astype(np.float64) * 3)
        assert partial.dtypes == {"b": "float32", "w": "float32"}
        assert partial.metrics["loss"] == MetricSum(1.5, 3.0)
        assert partial.spec == {
            "w": TensorSpec((3, 4), "float32"),
            "b": TensorSpec((4,), "float32"),
        }

    @pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), True, "3"])
    def test_rejects_bad_weight(self, weight: object) -> None:
        with pytest.raises(ValidationError, match="weight"):
            PartialAggregate.from_update(make_update(0), weight=weight)  # type: ignore[arg-type]

    def test_rejects_non_finite_metric(self) -> None:
        with pytest.raises(ValidationError, match="metric 'loss' is not finite"):
            PartialAggregate.from_update(make_update(0), weight=1, metrics={"loss": float("nan")})

    def test_rejects_non_numeric_tensor(self) -> None:
        with pytest.raises(ValidationError, match="'flag' must be a numeric array"):
            PartialAggregate.from_update({"flag": np.array([True])}, weight=1)

    def test_sums_are_read_only(self) -> None:
        partial = PartialAggregate.from_update(make_update(0), weight=1)
        with pytest.raises(ValueError, match="read-only"):
            partial.sums["w"][0, 0] = 1.0


class TestMonoid:
    def test_zero_is_identity_on_both_sides(self) -> None:
        # Prepare
        x = PartialAggregate.from_update(make_update(1), weight=2, metrics={"acc": 0.8})
        zero = PartialAggregate.zero()

        # Execute / Assert
        assert zero.is_zero and zero.count == 0 and zero.weight == 0.0 and not zero.sums
        assert x + zero == x
        assert zero + x == x
        assert zero + zero == zero

    def test_add_is_commutative_bit_for_bit(self) -> None:
        a = PartialAggregate.from_update(make_update(1), weight=2, metrics={"loss": 1.0})
        b = PartialAggregate.from_update(make_update(2), weight=5, metrics={"loss": 3.0})

        assert (a + b).to_bytes() == (b + a).to_bytes()

    def test_add_sums_everything(self) -> None:
        # Prepare
        ua, ub = make_update(1), make_update(2)
        a = PartialAggregate.from_update(ua, weight=2, metrics={"loss": 1.0})
        b = PartialAggregate.from_update(ub, weight=5, metrics={"loss": 3.0, "acc": 0.5})

        # Execute
        total = a + b

        # Assert
        assert total.count == 2
        assert total.weight == 7.0
        expected = 2 * ua["b"].astype(np.float64) + 5 * ub["b"].astype(np.float64)
        np.testing.assert_allclose(total.sums["b"], expected, rtol=1e-15)
        assert total.metrics == {"loss": MetricSum(17.0, 7.0), "acc": MetricSum(2.5, 5.0)}

    def test_mismatched_names_raise_not_assert(self) -> None:
        a = PartialAggregate.from_update({"w": np.zeros(2, np.float32)}, weight=1)
        b = PartialAggregate.from_update({"v": np.zeros(2, np.float32)}, weight=1)

        with pytest.raises(InconsistentPartials, match=r"missing: \['w'\]; unexpected: \['v'\]"):
            _ = a + b

    def test_mismatched_shapes_raise(self) -> None:
        a = PartialAggregate.from_update({"w": np.zeros(2, np.float32)}, weight=1)
        b = PartialAggregate.from_update({"w": np.zeros(3, np.float32)}, weight=1)

        with pytest.raises(InconsistentPartials, match=r"'w' is \(3,\) float32, expected \(2,\)"):
            _ = a + b

    def test_mismatched_dtypes_raise(self) -> None:
        a = PartialAggregate.from_update({"w": np.zeros(2, np.float32)}, weight=1)
        b = PartialAggregate.from_update({"w": np.zeros(2, np.float16)}, weight=1)

        with pytest.raises(InconsistentPartials, match="float16"):
            _ = a + b

    def test_adding_a_non_partial_is_a_type_error(self) -> None:
        with pytest.raises(TypeError):
            _ = PartialAggregate.zero() + 1  # type: ignore[operator]


class TestFinalize:
    def test_weighted_mean_matches_np_average(self) -> None:
        # Prepare
        updates = [make_update(i) for i in range(4)]
        weights = [1.0, 10.0, 3.0, 7.0]
        losses = [0.9, 0.1, 0.5, 0.3]
        total = PartialAggregate.zero()
        for update, weight, loss in zip(updates, weights, losses, strict=True):
            total = total + PartialAggregate.from_update(
                update, weight=weight, metrics={"loss": loss}
            )

        # Execute
        mean, metrics = total.finalize()

        # Assert
        for name in ("w", "b"):
            expected = np.average(np.stack([u[name] for u in updates]), axis=0, weights=weights)
            assert mean[name].dtype == np.float32
            np.testing.assert_allclose(mean[name], expected, rtol=1e-6, atol=1e-7)
        assert metrics["loss"] == pytest.approx(np.average(losses, weights=weights), rel=1e-12)

    def test_metric_mean_uses_only_reporting_devices(self) -> None:
        a = PartialAggregate.from_update(make_update(0), weight=1, metrics={"loss": 1.0})
        b = PartialAggregate.from_update(
            make_update(1), weight=3, metrics={"loss": 2.0, "acc": 0.6}
        )

        _, metrics = (a + b).finalize()

        assert metrics == {"loss": pytest.approx(1.75), "acc": pytest.approx(0.6)}

    def test_integer_tensors_round_to_nearest(self) -> None:
        a = PartialAggregate.from_update({"steps": np.array([2, 3], np.int64)}, weight=1)
        b = PartialAggregate.from_update({"steps": np.array([3, 4], np.int64)}, weight=2)

        mean, _ = (a + b).finalize()

        # (2 + 6) / 3 = 2.67 -> 3; (3 + 8) / 3 = 3.67 -> 4
        np.testing.assert_array_equal(mean["steps"], np.array([3, 4], np.int64))

    def test_zero_raises_clear_error(self) -> None:
        with pytest.raises(EmptyAggregate, match="no device update was accepted"):
            PartialAggregate.zero().finalize()


class TestBytes:
    def test_round_trip_is_bit_for_bit(self) -> None:
        # Prepare
        total = PartialAggregate.from_update(make_update(3), weight=0.1, metrics={"loss": 1 / 3})
        total = total + PartialAggregate.from_update(make_update(4), weight=0.7, metrics={"x": 2.0})

        # Execute
        data = total.to_bytes()
        back = PartialAggregate.from_bytes(data, source="s3://b/partials/n1.safetensors")

        # Assert
        assert back == total
        assert back.to_bytes() == data
        assert back.weight.hex() == total.weight.hex()
        for name in total.sums:
            assert back.sums[name].tobytes() == total.sums[name].tobytes()

    def test_zero_round_trips(self) -> None:
        zero = PartialAggregate.zero()
        assert PartialAggregate.from_bytes(zero.to_bytes()) == zero

    def test_plain_safetensors_is_not_a_partial(self) -> None:
        data = encode_tensors({"w": np.zeros(2)})
        with pytest.raises(ValidationError, match="node7: not a partial aggregate"):
            PartialAggregate.from_bytes(data, source="node7")

    def test_truncated_bytes_name_the_source(self) -> None:
        data = PartialAggregate.from_update(make_update(0), weight=1).to_bytes()
        with pytest.raises(ValidationError, match="node7"):
            PartialAggregate.from_bytes(data[: len(data) // 2], source="node7")

    def test_wrong_format_version_is_refused(self) -> None:
        tensors, meta = decode_tensors(
            PartialAggregate.from_update(make_update(0), weight=1).to_bytes()
        )
        header = json.loads(meta[META_KEY])
        header["format"] = "canopy.partial-aggregate/99"
        data = encode_tensors(tensors, {META_KEY: json.dumps(header)})

        expected = re.escape("expected 'canopy.partial-aggregate/1'")
        with pytest.raises(ValidationError, match=expected):
            PartialAggregate.from_bytes(data)

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [
            ("weight", -1.0, "weight must be finite and >= 0"),
            ("weight", "1.0", "weight must be a number"),
            ("count", 0, "all zero/empty or all non-zero"),
            ("count", 1.5, "count must be an int"),
            ("dtypes", {"w": "float32"}, "sums name"),
            ("metrics", {"loss": [1.0, 0.0]}, "positive finite weight"),
            ("metrics", {"loss": 1.0}, "malformed partial metadata"),
        ],
    )
    def test_bad_metadata_is_refused(self, field: str, value: object, message: str) -> None:
        partial = PartialAggregate.from_update(make_update(0), weight=2, metrics={"loss": 1.0})
        tensors, meta = decode_tensors(partial.to_bytes())
        header = json.loads(meta[META_KEY])
        header[field] = value
        data = encode_tensors(tensors, {META_KEY: json.dumps(header)})

        with pytest.raises(ValidationError, match=message):
            PartialAggregate.from_bytes(data, source="p")

    def test_non_finite_sum_is_refused(self) -> None:
        partial = PartialAggregate.from_update(make_update(0), weight=2)
        tensors, meta = decode_tensors(partial.to_bytes())
        tensors["w"][1, 1] = np.inf

        with pytest.raises(ValidationError, match="sum of tensor 'w' is not finite"):
            PartialAggregate.from_bytes(encode_tensors(tensors, meta))

    def test_float32_sums_are_refused(self) -> None:
        partial = PartialAggregate.from_update(make_update(0), weight=2)
        tensors, meta = decode_tensors(partial.to_bytes())
        tensors["b"] = tensors["b"].astype(np.float32)

        with pytest.raises(ValidationError, match="'b' must be a float64 array"):
            PartialAggregate.from_bytes(encode_tensors(tensors, meta))

    def test_expected_spec_mismatch_is_inconsistent(self) -> None:
        data = PartialAggregate.from_update(make_update(0), weight=1).to_bytes()
        spec = {"w": TensorSpec((3, 4), "float32"), "b": TensorSpec((5,), "float32")}

        with pytest.raises(InconsistentPartials, match="does not match the global model"):
            PartialAggregate.from_bytes(data, expected_spec=spec)


class TestVectors:
    def test_summing_vectors_equals_summing_partials(self) -> None:
        # Prepare
        a = PartialAggregate.from_update(make_update(5), weight=4, metrics={"loss": 0.2})
        b = PartialAggregate.from_update(make_update(6), weight=9, metrics={"loss": 0.4})

        # Execute
        summed = [va + vb for va, vb in zip(a.to_vectors(), b.to_vectors(), strict=True)]
        rebuilt = a.from_vectors(summed)

        # Assert
        assert rebuilt == a + b

    def test_vectors_are_flat_float64(self) -> None:
        partial = PartialAggregate.from_update(make_update(5), weight=4, metrics={"loss": 0.2})

        vectors = partial.to_vectors()

        assert [v.shape for v in vectors] == [(4,), (12,), (4,)]  # b, w, scalars
        assert all(v.dtype == np.float64 for v in vectors)
        np.testing.assert_array_equal(vectors[-1], [4.0, 1.0, 0.8, 4.0])

    def test_wrong_vector_count_or_size_is_refused(self) -> None:
        partial = PartialAggregate.from_update(make_update(5), weight=4)
        vectors = partial.to_vectors()

        with pytest.raises(ValidationError, match="expected 3 vectors, got 2"):
            partial.from_vectors(vectors[:2])
        with pytest.raises(ValidationError, match="has 3 elements, expected 4"):
            partial.from_vectors([vectors[0][:3], vectors[1], vectors[2]])
        with pytest.raises(ValidationError, match="not an integer"):
            partial.from_vectors([vectors[0], vectors[1], np.array([4.0, 1.5])])


class TestScaled:
    def test_shrinks_the_sums_only(self) -> None:
        a = PartialAggregate.from_update(make_update(1), weight=2, metrics={"loss": 1.0}, norm=9)
        total = a + PartialAggregate.from_update(make_update(2), weight=3, norm=2.0)

        half = total.scaled(0.5)

        assert half.weight == total.weight and half.count == total.count
        assert half.metrics == total.metrics and half.norms == total.norms
        for name, arr in total.sums.items():
            np.testing.assert_array_equal(half.sums[name], arr * 0.5)
        assert total.scaled(1.0) is total and PartialAggregate.zero().scaled(0.1).is_zero
        # as if each update had been clipped by the factor before it was summed
        clipped = PartialAggregate.from_update(
            {n: v * np.float32(0.5) for n, v in make_update(1).items()}, weight=2
        )
        np.testing.assert_allclose(a.scaled(0.5).sums["w"], clipped.sums["w"], rtol=1e-6)

    @pytest.mark.parametrize("factor", [0.0, -0.5, 1.5, float("nan"), float("inf")])
    def test_refuses_factors_outside_zero_one(self, factor: float) -> None:
        with pytest.raises(ValidationError, match="scale factor"):
            PartialAggregate.from_update(make_update(1), weight=1).scaled(factor)


class TestNorms:
    def test_partials_carry_and_add_the_norms_they_summed(self) -> None:
        a = PartialAggregate.from_update(make_update(1), weight=2, norm=0.5)
        b = PartialAggregate.from_update(make_update(2), weight=3, norm=40.0)
        c = PartialAggregate.from_update(make_update(3), weight=1)  # norm not measured

        total = a + b + c

        assert total.count == 3 and total.norms == NormHistogram.of([0.5, 40.0])
        assert (b + a).norms == total.norms
        assert c.norms == NormHistogram.zero() and PartialAggregate.zero().norms.total == 0

    def test_norms_survive_the_bytes_round_trip(self) -> None:
        total = PartialAggregate.from_update(make_update(1), weight=2, norm=0.5)
        total = total + PartialAggregate.from_update(make_update(2), weight=3, norm=0.5)

        data = total.to_bytes()
        back = PartialAggregate.from_bytes(data)

        assert back == total and back.norms.total == 2
        assert back.to_bytes() == data

    def test_without_norms_the_bytes_are_as_before(self) -> None:
        partial = PartialAggregate.from_update(make_update(0), weight=2, metrics={"loss": 1.0})
        _, meta = decode_tensors(partial.to_bytes())

        header = json.loads(meta[META_KEY])

        assert set(header) == {"format", "weight", "count", "dtypes", "metrics"}

    @pytest.mark.parametrize(
        ("norms", "message"),
        [
            ({"10": 3}, "3 norms counted for 2 updates"),
            ({"10": -1}, "malformed partial metadata"),
            ([1], "malformed partial metadata"),
        ],
    )
    def test_bad_norms_metadata_is_refused(self, norms: object, message: str) -> None:
        partial = PartialAggregate.from_update(make_update(0), weight=2, norm=1.0)
        partial = partial + PartialAggregate.from_update(make_update(1), weight=2, norm=1.0)
        tensors, meta = decode_tensors(partial.to_bytes())
        header = json.loads(meta[META_KEY])
        header["norms"] = norms

        with pytest.raises(ValidationError, match=message):
            PartialAggregate.from_bytes(encode_tensors(tensors, {META_KEY: json.dumps(header)}))

    def test_constructor_refuses_more_norms_than_updates(self) -> None:
        partial = PartialAggregate.from_update(make_update(0), weight=2)

        with pytest.raises(ValidationError, match="2 norms counted for 1 updates"):
            PartialAggregate(
                sums=dict(partial.sums),
                dtypes=dict(partial.dtypes),
                weight=2.0,
                count=1,
                metrics={},
                norms=NormHistogram.of([1.0, 2.0]),
            )

    def test_vectors_carry_the_dense_histogram_last(self) -> None:
        a = PartialAggregate.from_update(make_update(5), weight=4, metrics={"loss": 0.2}, norm=1.0)
        b = PartialAggregate.from_update(make_update(6), weight=9, metrics={"loss": 0.4}, norm=9.0)

        va, vb = a.to_vectors(), b.to_vectors()
        rebuilt = a.from_vectors([x + y for x, y in zip(va, vb, strict=True)])

        assert [v.shape for v in va] == [(4,), (12,), (4,), (NUM_BINS,)]
        assert rebuilt == a + b
        with pytest.raises(ValidationError, match="expected 4 vectors, got 3"):
            a.from_vectors(va[:3])
