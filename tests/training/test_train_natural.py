"""Natural partitions (one owner's examples per device) and what a dataset may hold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.data import Dataset, PartitionError, PartitionScheme, device_partition, partition_indices
from edge.data.partition import natural_owners, natural_partition
from infra.errors import ValidationError

NATURAL = PartitionScheme(kind="natural", min_size=1)


def _writers(num_owners: int, n: int, seed: int) -> np.ndarray:
    """LEAF-style string owner ids, every owner holding at least one example."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"f{i:04d}_{i % 7:02d}" for i in range(num_owners)])
    return ids[np.concatenate([np.arange(num_owners), rng.integers(0, num_owners, n - num_owners)])]


@settings(max_examples=40, deadline=None)
@given(num_owners=st.integers(1, 40), extra=st.integers(0, 200), seed=st.integers(0, 10_000))
def test_each_device_holds_exactly_one_owners_examples(
    num_owners: int, extra: int, seed: int
) -> None:
    owners = _writers(num_owners, num_owners + extra, seed)
    num_devices = max(1, num_owners - seed % 3)  # as many devices as owners, or fewer

    parts = partition_indices(
        np.zeros(owners.shape[0], int), NATURAL, num_devices, seed, owners=owners
    )

    held = [set(owners[p].tolist()) for p in parts]
    assert all(len(h) == 1 for h in held), "a device mixes owners"
    assert len({next(iter(h)) for h in held}) == num_devices, "two devices share an owner"
    for part, h in zip(parts, held, strict=True):
        assert np.array_equal(part, np.flatnonzero(owners == next(iter(h)))), "owner split"
    if num_devices == num_owners:
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(owners.shape[0]))


def test_natural_partitions_are_reproducible_and_pick_owners_by_seed() -> None:
    owners = np.repeat(np.arange(30), 3)  # integer user ids work too
    first = natural_owners(owners, 8, seed=7, min_size=1)

    assert np.array_equal(first, natural_owners(owners, 8, seed=7, min_size=1))
    assert not np.array_equal(first, natural_owners(owners, 8, seed=8, min_size=1))
    parts = natural_partition(owners, 8, seed=7, min_size=1)
    assert [int(owners[p][0]) for p in parts] == first.tolist()


def test_owners_with_fewer_than_min_size_examples_are_never_picked() -> None:
    owners = np.array([0, 0, 0, 1, 2, 2, 2, 3])  # owners 1 and 3 hold one example each
    for seed in range(20):
        assert set(natural_owners(owners, 2, seed, min_size=2).tolist()) == {0, 2}


def test_too_few_owners_or_none_fail_with_the_count_and_the_fix() -> None:
    owners = np.repeat(np.arange(5), 4)
    with pytest.raises(PartitionError, match=r"6 devices need 6 owners .* has 5 .* at most 5"):
        partition_indices(np.zeros(20, int), NATURAL, 6, 0, owners=owners)
    with pytest.raises(PartitionError, match=r"no per-example owner ids \(Dataset\.train_owners\)"):
        partition_indices(np.zeros(20, int), NATURAL, 2, 0)


def test_label_skew_schemes_refuse_regression_targets() -> None:
    with pytest.raises(PartitionError, match="use kind iid or natural"):
        partition_indices(np.zeros(20, np.float32), PartitionScheme(kind="dirichlet"), 2, 0)


def _femnist_like(num_writers: int = 6, per_writer: int = 5) -> Dataset:
    """1x28x28 float32 images, string writer ids, as LEAF's FEMNIST ships them."""
    rng = np.random.default_rng(0)
    n = num_writers * per_writer
    writers = np.repeat([f"f{w:04d}_{w:02d}" for w in range(num_writers)], per_writer)
    return Dataset(
        name="femnist-like",
        generated=True,
        x_train=rng.random((n, 1, 28, 28), dtype=np.float32),
        y_train=rng.integers(0, 62, n),
        x_test=rng.random((num_writers, 1, 28, 28), dtype=np.float32),
        y_test=rng.integers(0, 62, num_writers),
        num_classes=62,
        train_owners=writers,
        test_owners=np.array([f"f{w:04d}_{w:02d}" for w in range(num_writers)]),
    )


def test_device_partition_of_a_natural_dataset_is_one_writers_images() -> None:
    dataset = _femnist_like()
    scheme = PartitionScheme(kind="natural", min_size=5)
    writer = natural_owners(dataset.train_owners, 4, 3, 5)[2]  # type: ignore[arg-type]

    x, y = device_partition(dataset, scheme, device_index=2, num_devices=4, seed=3)

    rows = np.flatnonzero(dataset.train_owners == writer)
    assert x.dtype == np.float32 and x.shape == (5, 1, 28, 28)
    assert np.array_equal(x, dataset.x_train[rows]) and np.array_equal(y, dataset.y_train[rows])
    assert dataset.owners("test") is dataset.test_owners


def test_datasets_refuse_shapes_and_dtypes_they_cannot_hand_out() -> None:
    good = _femnist_like()
    fields = {k: getattr(good, k) for k in good.__dataclass_fields__}
    cases = [
        ({"train_owners": good.train_owners[:-1]}, r"train_owners has shape \(29,\)"),
        ({"x_train": (good.x_train * 255).astype(np.uint8)}, "uint8 is read as"),
        ({"x_test": np.zeros((6, 1, 27, 28), np.float32)}, "test examples have shape"),
        ({"x_train": np.zeros(30, np.float32)}, r"expected \(N, \*sample_shape\)"),
        ({"y_train": good.y_train.astype(np.float32)}, "labels must be integers"),
        ({"num_classes": 0}, "regression .* must be floating point"),
    ]
    for change, message in cases:
        with pytest.raises(ValidationError, match=message):
            Dataset(**{**fields, **change})


def test_regression_datasets_hand_out_float32_targets() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 2))  # float64 tabular data
    data = Dataset("tabular", True, x, y, x[:3], y[:3], num_classes=0)

    xs, ys = data.take("train", np.array([1, 4]))

    assert data.is_regression and data.target_shape == (2,) and data.sample_shape == (4,)
    assert xs.dtype == np.float32 and ys.dtype == np.float32 and ys.shape == (2, 2)
    np.testing.assert_allclose(ys, y[[1, 4]], rtol=1e-6)
