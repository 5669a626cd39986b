"""Partitioners: which training examples each simulated device holds.

All are pure functions of (labels or owners, scheme, number of devices, seed): a
device's partition is fixed and reproducible, so a simulator process that knows
only its device index rebuilds exactly the slice it owns, and two processes never
disagree. Partitions are disjoint; ``iid`` and ``dirichlet`` always cover every
example, ``shards`` covers every example whenever each label is held by at least
one device (``num_devices * labels_per_device >= num_classes``, checked), and
``full`` gives every device the whole set (XOR, where each phone has the truth table).

``natural`` uses the data's own split: each device holds every example of one
owner (``Dataset.train_owners``: a LEAF writer, an app's user). Owners are
assigned by a seeded permutation of those with at least ``min_size`` examples;
with more owners than devices the rest are left out (real deployments never see
every user either), with fewer it fails, since splitting an owner would no
longer be natural.

For federated evaluation each simulated device also keeps a held-out part of
its own partition (``holdout_split``: a seeded fraction of its examples) that
it evaluates the global model on and never trains on; ``device_split`` gives
both parts. With ``full`` every device holds the same examples, so one
device's held-out examples are other devices' training data there.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge.data.dataset import Dataset
from edge.data.errors import PartitionError

PartitionKind = Literal["iid", "dirichlet", "shards", "full", "natural"]
_MAX_DIRICHLET_DRAWS = 100


class PartitionScheme(BaseModel):
    """How a dataset is split among devices (``natural``: one owner's examples per device,
    for datasets with per-example owner ids)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: PartitionKind = Field(default="iid", description="iid, dirichlet, shards, full, natural.")
    alpha: float = Field(
        default=0.5,
        gt=0,
        description="dirichlet: concentration; smaller means more label skew per device.",
    )
    labels_per_device: int = Field(
        default=2, ge=1, description="shards: how many distinct labels each device holds."
    )
    min_size: int = Field(
        default=2, ge=1, description="Fewest examples any device may hold; smaller fails."
    )


def _check_devices(num_devices: int, device_index: int | None = None) -> None:
    if num_devices < 1:
        raise PartitionError(f"num_devices must be >= 1, got {num_devices}")
    if device_index is not None and not 0 <= device_index < num_devices:
        raise PartitionError(f"device_index {device_index} is outside 0..{num_devices - 1}")


def iid_partition(num_examples: int, num_devices: int, seed: int) -> list[np.ndarray]:
    """A random permutation cut into ``num_devices`` near-equal parts."""
    _check_devices(num_devices)
    order = np.random.default_rng([seed, 1]).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_devices)]


def dirichlet_partition(
    labels: np.ndarray, num_devices: int, alpha: float, seed: int, min_size: int
) -> list[np.ndarray]:
    """Label skew: each label's examples split by proportions drawn from Dir(alpha).

    Draws are repeated (from the same seeded stream, so still reproducible) until
    every device holds at least ``min_size`` examples.
    """
    _check_devices(num_devices)
    rng = np.random.default_rng([seed, 2])
    classes = np.unique(labels)
    for _ in range(_MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * members.shape[0]).astype(np.int64)
            for device, chunk in enumerate(np.split(members, cuts)):
                parts[device].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(p.shape[0] for p in result) >= min_size:
            return result
    raise PartitionError(
        f"dirichlet(alpha={alpha}) could not give all {num_devices} devices at least "
        f"{min_size} of {labels.shape[0]} examples in {_MAX_DIRICHLET_DRAWS} draws; "
        "raise alpha, lower min_size or use fewer devices"
    )


def shard_partition(
    labels: np.ndarray, num_devices: int, labels_per_device: int, seed: int
) -> list[np.ndarray]:
    """Each device holds exactly ``labels_per_device`` labels (fewer if there are fewer).

    Labels are dealt round-robin from a seeded permutation, so each label goes to
    about the same number of devices; a label's examples are then split evenly
    among the devices holding it.
    """
    _check_devices(num_devices)
    rng = np.random.default_rng([seed, 3])
    classes = rng.permutation(np.unique(labels))
    k = min(labels_per_device, classes.shape[0])
    if num_devices * k < classes.shape[0]:
        raise PartitionError(
            f"shards: {num_devices} devices x {k} labels cannot cover {classes.shape[0]} labels; "
            "use more devices or more labels per device"
        )
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for device in range(num_devices):
        for j in range(k):
            holders[int(classes[(device * k + j) % classes.shape[0]])].append(device)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for label, devices in holders.items():
        members = rng.permutation(np.flatnonzero(labels == label))
        for device, chunk in zip(devices, np.array_split(members, len(devices)), strict=True):
            parts[device].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _eligible_owners(
    owners: np.ndarray, num_devices: int, seed: int, min_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner ids, per-example owner index, chosen owner index per device)."""
    _check_devices(num_devices)
    ids, inverse, counts = np.unique(owners, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(counts >= min_size)
    if eligible.shape[0] < num_devices:
        raise PartitionError(
            f"natural partition: {num_devices} devices need {num_devices} owners with at "
            f"least min_size={min_size} examples, but the data has {eligible.shape[0]} "
            f"(of {ids.shape[0]} owners); use at most {eligible.shape[0]} devices, lower "
            "min_size, or another partition kind (iid, dirichlet, shards)"
        )
    chosen = np.random.default_rng([seed, 4]).permutation(eligible)[:num_devices]
    return ids, inverse, chosen


def natural_owners(owners: np.ndarray, num_devices: int, seed: int, min_size: int) -> np.ndarray:
    """The owner id each device holds under ``natural_partition`` (same arguments).

    A device's held-out examples are then the test examples of the same owner.
    """
    ids, _, chosen = _eligible_owners(owners, num_devices, seed, min_size)
    held: np.ndarray = ids[chosen]
    return held


def natural_partition(
    owners: np.ndarray, num_devices: int, seed: int, min_size: int
) -> list[np.ndarray]:
    """Device ``i`` holds every example of one owner; owners chosen by a seeded permutation.

    ``owners``: ``(N,)`` ids (integers or strings). Only owners with at least
    ``min_size`` examples are eligible; there must be at least ``num_devices``.
    """
    _, inverse, chosen = _eligible_owners(owners, num_devices, seed, min_size)
    # One stable sort groups every owner's examples, in index order: O(N log N),
    # not one scan per device (LEAF FEMNIST has 3,500 writers).
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate(([0], np.cumsum(np.bincount(inverse))))
    return [order[starts[owner] : starts[owner + 1]] for owner in chosen]


def partition_indices(
    labels: np.ndarray,
    scheme: PartitionScheme,
    num_devices: int,
    seed: int,
    *,
    owners: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Training-example indices of every device, checked against ``scheme.min_size``.

    ``owners`` (per-example owner ids) is needed by, and only used by, ``natural``.
    """
    if scheme.kind == "natural":
        if owners is None:
            raise PartitionError(
                "natural partition: the dataset has no per-example owner ids "
                "(Dataset.train_owners); give them in the job's dataset, or use another "
                "partition kind (iid, dirichlet, shards)"
            )
        if owners.shape != labels.shape[:1]:
            raise PartitionError(
                f"natural partition: {owners.shape[0]} owner ids for {labels.shape[0]} examples"
            )
        parts = natural_partition(owners, num_devices, seed, scheme.min_size)
    elif scheme.kind in ("dirichlet", "shards") and not np.issubdtype(labels.dtype, np.integer):
        raise PartitionError(
            f"{scheme.kind} partition: it splits examples by class label, and these targets "
            f"are {labels.dtype} (regression); use kind iid or natural"
        )
    elif scheme.kind == "full":
        _check_devices(num_devices)
        everything = np.arange(labels.shape[0])
        parts = [everything] * num_devices
    elif scheme.kind == "iid":
        parts = iid_partition(labels.shape[0], num_devices, seed)
    elif scheme.kind == "dirichlet":
        parts = dirichlet_partition(labels, num_devices, scheme.alpha, seed, scheme.min_size)
    else:
        parts = shard_partition(labels, num_devices, scheme.labels_per_device, seed)
    smallest = min(p.shape[0] for p in parts)
    if smallest < scheme.min_size:
        raise PartitionError(
            f"{scheme.kind} partition of {labels.shape[0]} examples over {num_devices} devices "
            f"leaves a device with {smallest} (< min_size {scheme.min_size}); "
            "use fewer devices or a larger dataset"
        )
    return parts


@functools.lru_cache(maxsize=8)
def _cached_partition(
    dataset: Dataset, scheme: PartitionScheme, num_devices: int, seed: int
) -> tuple[np.ndarray, ...]:
    # Keyed by dataset identity (Dataset hashes by id): a simulator asking for
    # thousands of devices partitions once, not once per device.
    return tuple(
        partition_indices(dataset.y_train, scheme, num_devices, seed, owners=dataset.train_owners)
    )


def holdout_split(
    indices: np.ndarray, fraction: float, seed: int, device_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)`` of one device's examples: a seeded ``fraction`` is held out.

    ``round(n * fraction)`` examples, but at least one held out and at least one
    kept for training whenever the device has two or more; ``fraction`` 0 (or a
    single example) holds out nothing. Both parts keep the order of ``indices``.
    """
    if not 0.0 <= fraction < 1.0:
        raise PartitionError(f"holdout fraction must be in [0, 1), got {fraction}")
    n = int(indices.shape[0])
    if fraction == 0.0 or n < 2:
        return indices, indices[:0]
    held = min(n - 1, max(1, round(n * fraction)))
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng([seed, 5, device_index]).permutation(n)[:held]] = True
    return indices[~chosen], indices[chosen]


def device_split(
    dataset: Dataset,
    scheme: PartitionScheme,
    device_index: int,
    num_devices: int,
    seed: int,
    holdout: float,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """One device's model-ready ``(train, held_out)`` data: its partition, less a held-out part.

    ``holdout`` 0 gives the whole partition for training (``device_partition``)
    and an empty held-out part.
    """
    _check_devices(num_devices, device_index)
    indices = _cached_partition(dataset, scheme, num_devices, seed)[device_index]
    train, held = holdout_split(indices, holdout, seed, device_index)
    return dataset.take("train", train), dataset.take("train", held)


def device_partition(
    dataset: Dataset,
    scheme: PartitionScheme,
    device_index: int,
    num_devices: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The model-ready training data of one device: ``float32`` features, and ``int64``
    labels or ``float32`` regression targets."""
    _check_devices(num_devices, device_index)
    indices = _cached_partition(dataset, scheme, num_devices, seed)[device_index]
    return dataset.take("train", indices)
