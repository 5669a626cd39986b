"""Property tests: any tree shape sums to the flat sum, and the wire forms are lossless.

These are the laws the Prefect tree relies on: leaves, middle nodes and the root
may group, order and serialise partials however the fan-out happens to go, and
the root must still see the same sum (up to float64 rounding). The norm histogram
that partials carry for the adaptive bound is summed exactly, whatever the tree.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aggregation.accumulator import Accumulator, sum_partials
from aggregation.norms import NormHistogram
from aggregation.partial import PartialAggregate
from aggregation.tensors import TensorDict, TensorSpec

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)

Device = tuple[TensorDict, float, dict[str, float]]

specs = st.dictionaries(
    keys=st.sampled_from(["conv.weight", "conv.bias", "fc.weight", "fc.bias", "scale"]),
    values=hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=5),
    min_size=1,
    max_size=4,
).map(lambda shapes: {name: TensorSpec(shape, "float32") for name, shape in shapes.items()})


@st.composite
def cohorts(draw: st.DrawFn, min_size: int = 1, max_size: int = 12) -> list[Device]:
    """Device updates of one model spec, with sample counts and (some) metrics."""
    spec = draw(specs)
    elements = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)
    size = draw(st.integers(min_size, max_size))
    devices: list[Device] = []
    for _ in range(size):
        update = {
            name: draw(hnp.arrays(np.float32, s.shape, elements=elements))
            for name, s in spec.items()
        }
        weight = float(draw(st.integers(1, 5000)))
        metrics = {"loss": draw(st.floats(0, 10))}
        if draw(st.booleans()):
            metrics["accuracy"] = draw(st.floats(0, 1))
        devices.append((update, weight, metrics))
    return devices


def norm_of(update: TensorDict) -> float:
    """The update's L2 norm over all tensors, as the guard would measure it."""
    return float(np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in update.values())))


def flat_reference(devices: list[Device]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Independent float64 sum of weight * update, and sum of |weight * update| (error scale)."""
    names = devices[0][0].keys()
    total = {n: np.sum([w * u[n].astype(np.float64) for u, w, _ in devices], axis=0) for n in names}
    scale = {
        n: np.sum([w * np.abs(u[n].astype(np.float64)) for u, w, _ in devices], axis=0)
        for n in names
    }
    return total, scale


def tree_sum(data: st.DataObject, parts: list[PartialAggregate]) -> PartialAggregate:
    """Sum ``parts`` through a random tree: random fan-out, child order, zero leaves
    and serialisation hops between levels."""
    if len(parts) == 1:
        node = parts[0]
    else:
        cuts = data.draw(
            st.sets(st.integers(1, len(parts) - 1), min_size=1, max_size=min(3, len(parts) - 1))
        )
        bounds = [0, *sorted(cuts), len(parts)]
        children = [tree_sum(data, parts[a:b]) for a, b in itertools.pairwise(bounds)]
        if data.draw(st.booleans()):
            children.append(PartialAggregate.zero())  # a leaf whose devices all failed
        children = data.draw(st.permutations(children))
        if data.draw(st.booleans()):
            node = sum_partials(children)
        else:
            node = PartialAggregate.zero()
            for child in children:
                node = node + child
    if data.draw(st.booleans()):  # the node's partial went through S3
        node = PartialAggregate.from_bytes(node.to_bytes())
    return node


def assert_sum_close(
    got: PartialAggregate, devices: list[Device], *, rel_to_magnitude: float
) -> None:
    reference, scale = flat_reference(devices)
    assert got.count == len(devices)
    assert got.weight == sum(w for _, w, _ in devices)  # integer sample counts: exact
    for name, expected in reference.items():
        error = np.abs(got.sums[name] - expected)
        assert np.all(error <= rel_to_magnitude * scale[name] + 1e-300), name
    assert got.norms == NormHistogram.of(norm_of(u) for u, _, _ in devices)  # exact: counts
    _, metrics = got.finalize()
    losses = [m["loss"] for _, _, m in devices]
    expected_loss = np.average(losses, weights=[w for _, w, _ in devices])
    assert abs(metrics["loss"] - expected_loss) <= 1e-12 * max(1.0, abs(expected_loss))


@PROPERTY_SETTINGS
@given(devices=cohorts(), data=st.data())
def test_random_tree_of_pure_partials_equals_flat_sum(
    devices: list[Device], data: st.DataObject
) -> None:
    # Prepare
    leaves = [
        PartialAggregate.from_update(u, weight=w, metrics=m, norm=norm_of(u)) for u, w, m in devices
    ]

    # Execute
    root = tree_sum(data, leaves)

    # Assert: float64 all the way, so only float64 reassociation error
    assert_sum_close(root, devices, rel_to_magnitude=1e-13)


@PROPERTY_SETTINGS
@given(devices=cohorts(max_size=20), data=st.data())
def test_random_tree_of_accumulated_leaves_equals_flat_sum(
    devices: list[Device], data: st.DataObject
) -> None:
    # Prepare: leaves of random size, each summed by an Accumulator
    flush_every = data.draw(st.integers(1, 16))
    block_elems = data.draw(st.sampled_from([1, 3, 8, 1 << 17]))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(devices)), max_size=4)) | {len(devices)})
    leaves, start = [], 0
    for stop in cuts:
        acc = Accumulator(
            {n: TensorSpec(a.shape, "float32") for n, a in devices[0][0].items()},
            flush_every=flush_every,
            block_elems=block_elems,
        )
        for update, weight, metrics in devices[start:stop]:
            acc.add(update, weight=weight, metrics=metrics, norm=norm_of(update))
        leaves.append(acc.result())
        start = stop

    # Execute
    root = tree_sum(data, leaves)

    # Assert: float32 staging of at most 16 products, then float64
    assert_sum_close(root, devices, rel_to_magnitude=2e-6)


@PROPERTY_SETTINGS
@given(devices=cohorts(max_size=4), data=st.data())
def test_bytes_round_trip_bit_for_bit(devices: list[Device], data: st.DataObject) -> None:
    # Prepare
    partial = tree_sum(
        data,
        [
            PartialAggregate.from_update(u, weight=w, metrics=m, norm=norm_of(u))
            for u, w, m in devices
        ],
    )

    # Execute
    data_bytes = partial.to_bytes()
    back = PartialAggregate.from_bytes(data_bytes)

    # Assert
    assert back == partial
    assert back.norms == partial.norms
    assert back.to_bytes() == data_bytes
    assert back.weight.hex() == partial.weight.hex()
    assert {k: (m.total.hex(), m.weight.hex()) for k, m in back.metrics.items()} == {
        k: (m.total.hex(), m.weight.hex()) for k, m in partial.metrics.items()
    }
    for name, arr in partial.sums.items():
        assert back.sums[name].tobytes() == arr.tobytes()
        assert back.dtypes[name] == "float32"


@PROPERTY_SETTINGS
@given(devices=cohorts(min_size=2, max_size=6))
def test_commutative_with_zero_identity(devices: list[Device]) -> None:
    (ua, wa, ma), (ub, wb, mb) = devices[:2]
    a = PartialAggregate.from_update(ua, weight=wa, metrics=ma, norm=norm_of(ua))
    b = PartialAggregate.from_update(ub, weight=wb, metrics=mb, norm=norm_of(ub))
    zero = PartialAggregate.zero()

    assert (a + b).to_bytes() == (b + a).to_bytes()
    assert (a + b).norms == (b + a).norms == a.norms + b.norms
    assert a + zero == a and zero + a == a


@PROPERTY_SETTINGS
@given(devices=cohorts(min_size=1, max_size=6))
def test_summing_vectors_equals_summing_partials(devices: list[Device]) -> None:
    # Prepare: same structure for every partial (pfl's precondition)
    parts = [
        PartialAggregate.from_update(u, weight=w, metrics={"loss": m["loss"]}, norm=norm_of(u))
        for u, w, m in devices
    ]

    # Execute
    vector_sum = [np.sum(vs, axis=0) for vs in zip(*(p.to_vectors() for p in parts), strict=True)]
    object_sum = PartialAggregate.zero()
    for part in parts:
        object_sum = object_sum + part
    rebuilt = parts[0].from_vectors(vector_sum)

    # Assert
    assert rebuilt.spec == object_sum.spec
    assert rebuilt.count == object_sum.count and rebuilt.weight == object_sum.weight
    for name, arr in object_sum.sums.items():
        np.testing.assert_allclose(rebuilt.sums[name], arr, rtol=1e-12, atol=1e-9)
    assert rebuilt.norms == object_sum.norms
    got, want = rebuilt.metrics["loss"], object_sum.metrics["loss"]
    assert got.weight == want.weight
    assert got.total == pytest.approx(want.total, rel=1e-12, abs=1e-12)
