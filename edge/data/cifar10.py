"""Real CIFAR-10 from the official python batch files: a local folder, S3, or torchvision.

The official ``cifar-10-batches-py`` files are Python pickles. Canopy refuses pickle
for everything that comes from devices or S3; the one exception is this trusted
dataset, read from the operator's own folder or bucket, and even then through a
restricted unpickler that can build only numpy arrays (``_reconstruct``,
``ndarray``, ``dtype``) and plain containers. By default each file's md5 must also
match the published checksum, so only the genuine files reach the unpickler at all.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge.data.config import CIFAR10_DIR_ENV, CIFAR10_S3_PREFIX_ENV
from edge.data.dataset import Dataset
from edge.data.errors import DatasetUnavailableError
from infra.errors import ObjectNotFoundError, ValidationError
from infra.store import ObjectStore

logger = logging.getLogger(__name__)

BATCH_FOLDER = "cifar-10-batches-py"
NUM_CLASSES = 10
# md5 of the official files, as published with the dataset (and used by torchvision).
TRAIN_FILES: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
}
TEST_FILES: dict[str, str] = {"test_batch": "40351d587109b95175f43aff81a1287e"}

HOW_TO_PROVIDE = (
    "Provide CIFAR-10 as the official python batch files (cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, unpacked): either point "
    f"${CIFAR10_DIR_ENV} (or DatasetConfig.path) at the folder holding {BATCH_FOLDER}/, "
    "or upload the files with edge.data.cifar10.upload_cifar10 (or `canopy upload-cifar10`) "
    f"and set ${CIFAR10_S3_PREFIX_ENV} (or DatasetConfig.s3_prefix). "
    "Use source=synthetic to train on generated CIFAR-shaped data instead."
)

# The array rebuild function numpy's pickles refer to; taken from numpy itself so it
# is right for numpy 1.x (numpy.core) and 2.x (numpy._core) alike.
_RECONSTRUCT: Callable[..., Any] = np.empty(0).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and builtin containers; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"CIFAR-10 batch file refers to {module}.{name}; only numpy arrays are allowed, "
                "so this is not a genuine CIFAR-10 file and it is refused"
            ) from None


def parse_batch(
    data: bytes, *, source: str, expected_md5: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's bytes to ``uint8`` images ``(n, 3, 32, 32)`` and ``int64`` labels."""
    if expected_md5 is not None:
        actual = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if actual != expected_md5:
            raise ValidationError(
                f"{source}: md5 {actual} is not the published {expected_md5}; the file is "
                "corrupted or not the official CIFAR-10 batch, refusing to unpickle it "
                "(set verify_checksums=False only for a re-packed copy you trust)"
            )
    try:
        batch = _ArraysOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValidationError(f"{source}: not a CIFAR-10 python batch file ({exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValidationError(f"{source}: expected a dict with b'data' and b'labels'")
    images = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or images.shape[0] != labels.shape[0]:
        raise ValidationError(
            f"{source}: data has shape {images.shape} for {labels.shape[0]} labels; "
            "expected (n, 3072) with one label per row"
        )
    return images.reshape(-1, 3, 32, 32), labels


def _assemble(read: Callable[[str], bytes], *, verify: bool, where: str) -> Dataset:
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for split, files in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        for name, md5 in files.items():
            expected = md5 if verify else None
            parts[split].append(
                parse_batch(read(name), source=f"{where}/{name}", expected_md5=expected)
            )
    x_train = np.concatenate([x for x, _ in parts["train"]])
    y_train = np.concatenate([y for _, y in parts["train"]])
    x_test = np.concatenate([x for x, _ in parts["test"]])
    y_test = np.concatenate([y for _, y in parts["test"]])
    logger.info(
        "dataset cifar10 (real) from %s: %d train, %d test", where, y_train.size, y_test.size
    )
    return Dataset(
        name="cifar10",
        generated=False,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=NUM_CLASSES,
    )


def find_batch_folder(root: Path) -> Path:
    """``root/cifar-10-batches-py`` or ``root`` itself, whichever holds the batch files."""
    for candidate in (root / BATCH_FOLDER, root):
        if (candidate / "data_batch_1").is_file():
            return candidate
    raise DatasetUnavailableError(f"CIFAR-10 batch files not found under {root}. {HOW_TO_PROVIDE}")


def load_cifar10_local(root: Path | None, *, verify_checksums: bool = True) -> Dataset:
    """Read the official batch files from the operator's folder."""
    if root is None:
        raise DatasetUnavailableError(f"no CIFAR-10 folder configured. {HOW_TO_PROVIDE}")
    folder = find_batch_folder(root)

    def read(name: str) -> bytes:
        path = folder / name
        if not path.is_file():
            raise DatasetUnavailableError(f"{path} is missing. {HOW_TO_PROVIDE}")
        return path.read_bytes()

    return _assemble(read, verify=verify_checksums, where=str(folder))


def load_cifar10_s3(
    store: ObjectStore, prefix: str | None, *, verify_checksums: bool = True
) -> Dataset:
    """Read the batch files from ``{prefix}{name}`` in the Canopy bucket.

    The store verifies each object's sha256 as recorded at upload, then the md5
    check confirms it is the official file; upload with :func:`upload_cifar10`.
    """
    if not prefix:
        raise DatasetUnavailableError(f"no CIFAR-10 S3 prefix configured. {HOW_TO_PROVIDE}")

    def read(name: str) -> bytes:
        try:
            return store.get(f"{prefix}{name}").data
        except ObjectNotFoundError as exc:
            raise DatasetUnavailableError(f"{exc}. {HOW_TO_PROVIDE}") from exc

    return _assemble(read, verify=verify_checksums, where=f"s3://{store.bucket}/{prefix}")


def upload_cifar10(store: ObjectStore, folder: Path, prefix: str) -> list[str]:
    """Copy the batch files from a local folder to ``{prefix}{name}``; returns the keys.

    Going through the store records each object's sha256, which every later read checks.
    """
    source = find_batch_folder(folder)
    keys = []
    for name in (*TRAIN_FILES, *TEST_FILES):
        key = f"{prefix}{name}"
        store.put_bytes(key, (source / name).read_bytes(), kind="dataset-cifar10-batch")
        keys.append(key)
    return keys


def download_cifar10(root: Path | None) -> Dataset:
    """Fetch CIFAR-10 with torchvision where a network exists.

    torchvision is optional (it is not a Canopy dependency), so it is imported
    here, only when this source is asked for.
    """
    if importlib.util.find_spec("torchvision") is None:
        raise DatasetUnavailableError(
            "source cifar10-download needs torchvision, which is not installed "
            f"(pip install torchvision, matching the torch version). {HOW_TO_PROVIDE}"
        )
    datasets = importlib.import_module("torchvision.datasets")
    target = root or Path.home() / ".cache" / "canopy" / "cifar10"
    try:
        datasets.CIFAR10(str(target), train=True, download=True)
    except (OSError, RuntimeError) as exc:
        raise DatasetUnavailableError(
            f"downloading CIFAR-10 failed ({exc}). {HOW_TO_PROVIDE}"
        ) from exc
    # torchvision leaves the official batch files behind; read them the same way.
    return load_cifar10_local(target)
