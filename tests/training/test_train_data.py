"""Datasets and partitions: real CIFAR-10 loading rules, generated data, partition properties."""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.data import (
    DatasetConfig,
    DatasetUnavailableError,
    PartitionError,
    PartitionScheme,
    device_partition,
    load_image_dataset,
    partition_indices,
)
from edge.data.cifar10 import load_cifar10_s3, upload_cifar10
from edge.data.config import CIFAR10_DIR_ENV
from edge.data.synthetic import SYNTHETIC_CIFAR_NAME, synthetic_cifar10_shaped
from edge.jobs import get_job
from edge.training import PyTorchTrainer, RoundModel, evaluate, initial_state
from infra.errors import ValidationError
from infra.store import MemoryObjectStore, S3ObjectStore

# ---------------------------------------------------------------- partitions


def _labels(n: int, classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["iid", "dirichlet", "shards"]),
    num_devices=st.integers(3, 30),
    seed=st.integers(0, 10_000),
)
def test_partitions_are_disjoint_and_cover_every_example(
    kind: str, num_devices: int, seed: int
) -> None:
    # Prepare
    labels = _labels(3_000, 10, seed)
    scheme = PartitionScheme(kind=kind, alpha=1.0, labels_per_device=4, min_size=1)  # type: ignore[arg-type]

    # Execute
    parts = partition_indices(labels, scheme, num_devices, seed)

    # Assert
    assert len(parts) == num_devices
    joined = np.concatenate(parts)
    assert joined.shape[0] == labels.shape[0], "some example is held twice or by nobody"
    assert np.array_equal(np.sort(joined), np.arange(labels.shape[0]))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards", "full"])
def test_partitions_are_reproducible_from_seed_and_differ_across_seeds(kind: str) -> None:
    labels = _labels(2_000, 10, 1)
    scheme = PartitionScheme(kind=kind, labels_per_device=2)  # type: ignore[arg-type]

    first = partition_indices(labels, scheme, 8, seed=7)
    again = partition_indices(labels, scheme, 8, seed=7)
    other = partition_indices(labels, scheme, 8, seed=8)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    if kind != "full":
        assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_shards_give_each_device_at_most_k_labels() -> None:
    labels = _labels(5_000, 10, 2)
    parts = partition_indices(labels, PartitionScheme(kind="shards", labels_per_device=2), 20, 3)
    assert max(np.unique(labels[p]).shape[0] for p in parts) <= 2


def test_shards_refuse_too_few_devices_to_cover_the_labels() -> None:
    with pytest.raises(PartitionError, match="cannot cover"):
        partition_indices(_labels(500, 10, 0), PartitionScheme(kind="shards"), 3, 0)


def _label_skew(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> float:
    """Mean total-variation distance between each device's label mix and the global one."""
    overall = np.bincount(labels, minlength=classes) / labels.shape[0]
    dists = []
    for part in parts:
        local = np.bincount(labels[part], minlength=classes) / part.shape[0]
        dists.append(0.5 * np.abs(local - overall).sum())
    return float(np.mean(dists))


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    labels = _labels(10_000, 10, 4)
    skews = [
        _label_skew(
            labels,
            partition_indices(labels, PartitionScheme(kind="dirichlet", alpha=a), 20, 5),
            10,
        )
        for a in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2], skews
    assert skews[0] < 0.1 and skews[2] > 0.5


def test_min_size_is_enforced_with_a_clear_error() -> None:
    labels = _labels(100, 10, 0)
    with pytest.raises(PartitionError, match="min_size"):
        partition_indices(labels, PartitionScheme(kind="iid", min_size=10), 20, 0)
    with pytest.raises(PartitionError, match="raise alpha"):
        partition_indices(labels, PartitionScheme(kind="dirichlet", alpha=0.01, min_size=4), 20, 0)


def test_device_partition_is_the_devices_slice_as_model_ready_arrays() -> None:
    dataset = synthetic_cifar10_shaped(train_size=600, test_size=50, seed=3)
    scheme = PartitionScheme(kind="dirichlet", alpha=0.5)
    parts = partition_indices(dataset.y_train, scheme, 6, 11)

    x, y = device_partition(dataset, scheme, device_index=4, num_devices=6, seed=11)

    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.shape == (parts[4].shape[0], 3, 32, 32)
    assert np.array_equal(y, dataset.y_train[parts[4]])
    with pytest.raises(PartitionError, match="outside"):
        device_partition(dataset, scheme, device_index=6, num_devices=6, seed=11)


# ---------------------------------------------------------------- generated data


def test_generated_cifar_shaped_data_says_it_is_generated_and_is_reproducible() -> None:
    a = load_image_dataset(DatasetConfig(source="synthetic", train_size=200, test_size=40, seed=5))
    b = synthetic_cifar10_shaped(train_size=200, test_size=40, seed=5)

    assert a.name == SYNTHETIC_CIFAR_NAME and a.generated
    assert a.x_train.shape == (200, 3, 32, 32) and a.x_train.dtype == np.uint8
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert np.bincount(a.y_train, minlength=10).tolist() == [20] * 10


def test_generated_cifar_shaped_data_is_learnable_above_chance() -> None:
    # Prepare: 1,500 examples, one device, a few epochs of eager training.
    job = get_job("cifar10-mobile")
    dataset = synthetic_cifar10_shaped(train_size=1_500, test_size=500, seed=0)
    x, y = dataset.split_arrays("train")
    x_test, y_test = dataset.split_arrays("test")
    state = initial_state(job, 0)

    # Execute
    result = PyTorchTrainer().train(
        job, RoundModel(state), x, y, job.hyperparams.model_copy(update={"local_epochs": 3})
    )
    trained = {k: state[k] + result.update[k] for k in state}

    # Assert: chance is 10%.
    assert evaluate(job, trained, x_test, y_test)["accuracy"] > 0.2


# ---------------------------------------------------------------- real CIFAR-10


def _write_fake_cifar(folder: Path, per_file: int = 20) -> dict[str, np.ndarray]:
    """Files with the official layout (not the official content: checksums are off)."""
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels_seen = []
    for name in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ):
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_file).tolist()
        labels_seen.append(np.asarray(labels))
        payload = {b"batch_label": b"x", b"labels": labels, b"data": data}
        (batches / name).write_bytes(pickle.dumps(payload, protocol=4))
    return {"train_labels": np.concatenate(labels_seen[:5]), "test_labels": labels_seen[5]}


def test_cifar10_local_reads_the_official_layout(tmp_path: Path) -> None:
    expected = _write_fake_cifar(tmp_path)

    ds = load_image_dataset(
        DatasetConfig(source="cifar10-local", path=tmp_path, verify_checksums=False)
    )

    assert ds.name == "cifar10" and not ds.generated
    assert ds.x_train.shape == (100, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    assert np.array_equal(ds.y_train, expected["train_labels"])
    assert np.array_equal(ds.y_test, expected["test_labels"])


def test_cifar10_files_that_are_not_the_published_ones_are_refused(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path)
    with pytest.raises(ValidationError, match="md5"):
        load_image_dataset(DatasetConfig(source="cifar10-local", path=tmp_path))


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_unpickler_refuses_anything_but_arrays(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"labels": [0], b"data": _Exploit(marker)}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(evil))

    with pytest.raises(ValidationError, match="only numpy arrays are allowed"):
        load_image_dataset(
            DatasetConfig(source="cifar10-local", path=tmp_path, verify_checksums=False)
        )
    assert not marker.exists()


def test_missing_cifar10_fails_with_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CIFAR10_DIR_ENV, raising=False)
    with pytest.raises(DatasetUnavailableError, match=CIFAR10_DIR_ENV):
        load_image_dataset(DatasetConfig(source="cifar10-local"))
    with pytest.raises(DatasetUnavailableError, match="not found under"):
        load_image_dataset(DatasetConfig(source="cifar10-local", path=tmp_path))
    with pytest.raises(DatasetUnavailableError, match="S3 prefix"):
        load_cifar10_s3(MemoryObjectStore(), None)


def test_cifar10_from_s3_matches_the_local_files(tmp_path: Path, s3_store: S3ObjectStore) -> None:
    _write_fake_cifar(tmp_path)
    local = load_image_dataset(
        DatasetConfig(source="cifar10-local", path=tmp_path, verify_checksums=False)
    )

    keys = upload_cifar10(s3_store, tmp_path, "datasets/cifar10/")
    remote = load_image_dataset(
        DatasetConfig(source="cifar10-s3", s3_prefix="datasets/cifar10/", verify_checksums=False),
        store=s3_store,
    )

    assert len(keys) == 6
    assert np.array_equal(local.x_train, remote.x_train)
    assert np.array_equal(local.y_test, remote.y_test)


def test_cifar10_download_needs_torchvision_or_says_so(tmp_path: Path) -> None:
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed; the missing-dependency message cannot be shown")
    with pytest.raises(DatasetUnavailableError, match="torchvision"):
        load_image_dataset(DatasetConfig(source="cifar10-download", path=tmp_path))
