"""An in-memory dataset with a train and a held-out test split.

Images are kept as stored (``uint8`` for CIFAR-10 and the generated CIFAR-shaped
data, 153 MB for 50,000 images) and turned into normalised ``float32`` only for
the rows a device actually takes: a simulator holding the whole training set once
would otherwise need 614 MB of floats.

What a dataset may hold (checked when it is built):

* **features** ``x``: ``(N, *sample_shape)``, the same sample shape in both
  splits. Tabular data is ``(N, F)`` real numbers; images are ``float32``
  ``(N, C, H, W)``, used as given, or ``uint8`` ``(N, 3, H, W)``, scaled to 0..1
  and normalised with the CIFAR-10 channel statistics (other ``uint8`` channel
  counts are refused: convert them to ``float32`` yourself). Devices get
  ``float32`` either way.
* **targets** ``y``: for classification (``num_classes >= 1``) integer labels
  ``(N,)`` in ``0 .. num_classes - 1``, handed out as ``int64``; for regression
  (``num_classes == 0``) real numbers ``(N, *target_shape)``, handed out as
  ``float32``.
* **owners** (optional): ``(N,)`` ids, integers or strings, of whoever produced
  each example (a LEAF FEMNIST writer, a user of an app). A natural partition
  (``PartitionScheme(kind="natural")``) gives each simulated device one owner's
  examples.
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
    """Features and targets of both splits, who owns each example, and where it came from.

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
        Features and targets (see the module docstring for shapes and dtypes).
    num_classes:
        Classification: number of label values (labels are ``0 .. num_classes - 1``).
        0 for regression targets.
    train_owners, test_owners:
        Optional per-example owner ids of each split (``(N,)``), for natural
        partitions; ``None`` when the data has no natural owners.
    """

    name: str
    generated: bool
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    train_owners: np.ndarray | None = None
    test_owners: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 0:
            raise ValidationError(
                f"dataset {self.name}: num_classes must be >= 1 (classification) or 0 "
                f"(regression), got {self.num_classes}"
            )
        for split, x, y, owners in (
            ("train", self.x_train, self.y_train, self.train_owners),
            ("test", self.x_test, self.y_test, self.test_owners),
        ):
            self._check_features(split, x)
            if x.shape[0] != y.shape[0]:
                raise ValidationError(
                    f"dataset {self.name}: {split} split has {x.shape[0]} feature rows but "
                    f"{y.shape[0]} labels"
                )
            self._check_targets(split, y)
            if owners is not None and owners.shape != (x.shape[0],):
                raise ValidationError(
                    f"dataset {self.name}: {split}_owners has shape {tuple(owners.shape)}, "
                    f"expected one owner id per example ({x.shape[0]},)"
                )
        if self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise ValidationError(
                f"dataset {self.name}: test examples have shape {tuple(self.x_test.shape[1:])} "
                f"but training examples {tuple(self.x_train.shape[1:])}"
            )

    def _check_features(self, split: str, x: np.ndarray) -> None:
        if x.ndim < 2:
            raise ValidationError(
                f"dataset {self.name}: {split} features have shape {tuple(x.shape)}; expected "
                "(N, *sample_shape), e.g. (N, F) for tabular data or (N, C, H, W) for images"
            )
        if x.dtype == np.uint8:
            if x.ndim != 4 or x.shape[1] != CIFAR10_MEAN.shape[0]:
                raise ValidationError(
                    f"dataset {self.name}: uint8 {split} features have shape {tuple(x.shape)}; "
                    "uint8 is read as (N, 3, H, W) colour images. Give other data as float32"
                )
        elif not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValidationError(
                f"dataset {self.name}: {split} features are {x.dtype}; expected real numbers"
            )

    def _check_targets(self, split: str, y: np.ndarray) -> None:
        if self.is_regression:
            if not np.issubdtype(y.dtype, np.floating):
                raise ValidationError(
                    f"dataset {self.name}: regression (num_classes=0) {split} targets must be "
                    f"floating point, got {y.dtype}"
                )
            return
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValidationError(
                f"dataset {self.name}: {split} labels must be integers of shape (N,), got "
                f"{y.dtype}{tuple(y.shape)} (regression targets need num_classes=0)"
            )
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValidationError(
                f"dataset {self.name}: {split} labels must lie in 0..{self.num_classes - 1}"
            )

    @property
    def is_regression(self) -> bool:
        """Whether the targets are real numbers (``num_classes == 0``) rather than labels."""
        return self.num_classes == 0

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one example as a model sees it, e.g. ``(3, 32, 32)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one example's target: ``()`` for labels and scalar regression targets."""
        return tuple(int(d) for d in self.y_train.shape[1:])

    def labels(self, split: Split) -> np.ndarray:
        return self.y_train if split == "train" else self.y_test

    def owners(self, split: Split) -> np.ndarray | None:
        """Per-example owner ids of a split, if the data has natural owners."""
        return self.train_owners if split == "train" else self.test_owners

    def take(self, split: Split, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``indices`` of a split, model-ready: ``float32`` features, ``int64`` labels
        (classification) or ``float32`` targets (regression)."""
        x = self.x_train if split == "train" else self.x_test
        y = self.labels(split)[indices]
        targets = y.astype(np.float32 if self.is_regression else np.int64, copy=False)
        return to_features(x[indices]), targets

    def split_arrays(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """A whole split, model-ready (used for held-out evaluation)."""
        return self.take(split, np.arange(self.labels(split).shape[0]))


def to_features(x: np.ndarray) -> np.ndarray:
    """``uint8`` NCHW images to normalised ``float32``; other features become ``float32``."""
    if x.dtype == np.uint8:
        scaled = x.astype(np.float32) / np.float32(255.0)
        return (scaled - CIFAR10_MEAN[:, None, None]) / CIFAR10_STD[:, None, None]
    return np.ascontiguousarray(x, dtype=np.float32)
