"""Datasets and partitions: what each (simulated) device trains on.

Real CIFAR-10 (local folder, S3, torchvision), generated data that always says it
is generated, and pure, reproducible partitioners (IID, Dirichlet label skew,
label shards) that a simulator can call knowing only its device index.
"""

from edge.data.config import DatasetConfig, DatasetSource
from edge.data.dataset import Dataset, to_features
from edge.data.errors import DatasetUnavailableError, PartitionError
from edge.data.partition import (
    PartitionScheme,
    device_partition,
    device_split,
    dirichlet_partition,
    holdout_split,
    iid_partition,
    partition_indices,
    shard_partition,
)
from edge.data.sources import load_image_dataset

__all__ = [
    "Dataset",
    "DatasetConfig",
    "DatasetSource",
    "DatasetUnavailableError",
    "PartitionError",
    "PartitionScheme",
    "device_partition",
    "device_split",
    "dirichlet_partition",
    "holdout_split",
    "iid_partition",
    "load_image_dataset",
    "partition_indices",
    "shard_partition",
    "to_features",
]
