"""Load CIFAR-10-like image data from whichever source a ``DatasetConfig`` names.

The only place that decides between generated and real data, so the rule "real
CIFAR-10 where asked, or a clear failure; generated data only when asked and
always named as generated" lives in one function.
"""

from __future__ import annotations

from edge.data.cifar10 import download_cifar10, load_cifar10_local, load_cifar10_s3
from edge.data.config import DatasetConfig
from edge.data.dataset import Dataset
from edge.data.errors import DatasetUnavailableError
from edge.data.synthetic import synthetic_cifar10_shaped
from infra.settings import S3Settings
from infra.store import ObjectStore, S3ObjectStore

SYNTHETIC_CIFAR_TRAIN_SIZE = 50_000
SYNTHETIC_CIFAR_TEST_SIZE = 10_000


def load_image_dataset(config: DatasetConfig, *, store: ObjectStore | None = None) -> Dataset:
    """CIFAR-10 (local folder, S3 or download) or generated CIFAR-shaped images.

    Parameters
    ----------
    config:
        The source and its location.
    store:
        For ``cifar10-s3``: the store to read from (default: the Canopy bucket from
        ``CANOPY_S3_*`` settings).
    """
    if config.source == "synthetic":
        return synthetic_cifar10_shaped(
            train_size=config.train_size or SYNTHETIC_CIFAR_TRAIN_SIZE,
            test_size=config.test_size or SYNTHETIC_CIFAR_TEST_SIZE,
            seed=config.seed,
        )
    if config.source == "cifar10-local":
        return load_cifar10_local(config.local_dir(), verify_checksums=config.verify_checksums)
    if config.source == "cifar10-s3":
        return load_cifar10_s3(
            store or S3ObjectStore(S3Settings()),
            config.resolved_s3_prefix(),
            verify_checksums=config.verify_checksums,
        )
    if config.source == "cifar10-download":
        return download_cifar10(config.path)
    raise DatasetUnavailableError(f"unknown dataset source {config.source!r}")
