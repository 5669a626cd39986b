"""An in-memory labelled dataset with a train and a held-out test split.

Images are kept as stored (``uint8`` for CIFAR-10 and the generated CIFAR-shaped
data, 153 MB for 50,000 images) and turned into normalised ``float32`` only for
the rows a device actually takes: a simulator holding the whole training set once
would otherwise need 614 MB of floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from infra.errors import ValidationError

Split = Literal["train", "test"]

# Per-channel mean and standard deviation of the CIFAR-10 training images (0..1
# scale): the usual normalisation, applied to real and generated CIFAR-shaped data.
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Features and integer labels of both splits, plus where they came from.

    ``eq=False`` keeps identity hashing, so partitions of one loaded dataset can be
    cached per object without hashing megabytes of arrays.

    Attributes
    ----------
    name:
        What the data is, as shown in logs and reports. Generated data always says
        so (``synthetic-cifar10-shaped``), real data is ``cifar10``.
    generated:
        True when the data was generated rather than read from a real dataset.
    x_train, y_train, x_test, y_test:
        Features (``uint8`` images in NCHW, or ``float32``) and ``int64`` labels.
    num_classes:
        Number of label values; labels are ``0 .. num_classes - 1``.
    """

    name: str
    generated: bool
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        splits = (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test))
        for split, x, y in splits:
            if x.shape[0] != y.shape[0]:
                raise ValidationError(
                    f"dataset {self.name}: {split} split has {x.shape[0]} feature rows but "
                    f"{y.shape[0]} labels"
                )
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValidationError(
                    f"dataset {self.name}: {split} labels must lie in 0..{self.num_classes - 1}"
                )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one example as a model sees it, e.g. ``(3, 32, 32)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def labels(self, split: Split) -> np.ndarray:
        return self.y_train if split == "train" else self.y_test

    def take(self, split: Split, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``indices`` of a split as model-ready ``float32`` features and ``int64`` labels."""
        x = self.x_train if split == "train" else self.x_test
        y = self.labels(split)
        return to_features(x[indices]), y[indices].astype(np.int64, copy=False)

    def split_arrays(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """A whole split, model-ready (used for held-out evaluation)."""
        return self.take(split, np.arange(self.labels(split).shape[0]))


def to_features(x: np.ndarray) -> np.ndarray:
    """``uint8`` NCHW images to normalised ``float32``; float features pass through."""
    if x.dtype == np.uint8:
        scaled = x.astype(np.float32) / np.float32(255.0)
        return (scaled - CIFAR10_MEAN[:, None, None]) / CIFAR10_STD[:, None, None]
    return np.ascontiguousarray(x, dtype=np.float32)
