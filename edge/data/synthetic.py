"""Generated datasets: CIFAR-shaped images with real class structure, XOR, hello vectors.

Generated data is always named as such (``synthetic-cifar10-shaped``), so a log,
a round report or a benchmark can never pass it off as CIFAR-10. The images have
learnable structure: each class owns a random low-frequency colour pattern, and
every example is that pattern with random contrast, brightness and heavy pixel
noise. A LeNet rises well above chance (10%) within a few hundred steps but does
not saturate at once.
"""

from __future__ import annotations

import logging

import numpy as np

from edge.data.dataset import Dataset

logger = logging.getLogger(__name__)

SYNTHETIC_CIFAR_NAME = "synthetic-cifar10-shaped"
XOR_NAME = "xor"
HELLO_NAME = "hello-vectors"

XOR_POINTS = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=np.float32)
XOR_LABELS = np.array([0, 1, 1, 0], dtype=np.int64)


def _class_templates(rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """One (3, 32, 32) template per class, on the 0..255 scale."""
    coarse = rng.normal(size=(num_classes, 3, 4, 4))  # (C, 3, 4, 4) coarse pattern
    pattern = np.kron(coarse, np.ones((1, 1, 8, 8)))  # (C, 3, 32, 32) upsampled blocks
    colour = rng.normal(size=(num_classes, 3, 1, 1))  # (C, 3, 1, 1) mean colour per class
    return 128.0 + 28.0 * pattern + 24.0 * colour


_CHUNK = 4096  # images generated at a time, bounding float64 scratch memory to ~100 MB


def _images(
    rng: np.random.Generator, templates: np.ndarray, labels: np.ndarray, noise: float
) -> np.ndarray:
    out = np.empty((labels.shape[0], 3, 32, 32), dtype=np.uint8)
    for start in range(0, labels.shape[0], _CHUNK):
        chunk = labels[start : start + _CHUNK]
        n = chunk.shape[0]
        contrast = rng.uniform(0.6, 1.4, size=(n, 1, 1, 1))
        brightness = rng.normal(0.0, 12.0, size=(n, 1, 1, 1))
        pixels = rng.normal(0.0, noise, size=(n, 3, 32, 32))
        base = templates[chunk]  # (n, 3, 32, 32)
        images = 128.0 + contrast * (base - 128.0) + brightness + pixels
        out[start : start + n] = np.clip(np.rint(images), 0, 255)
    return out


def synthetic_cifar10_shaped(
    *, train_size: int = 50_000, test_size: int = 10_000, seed: int = 0, noise: float = 64.0
) -> Dataset:
    """Generated 3x32x32 ``uint8`` images in 10 balanced classes, reproducible from ``seed``."""
    rng = np.random.default_rng([seed, 0xC1FA])
    num_classes = 10
    templates = _class_templates(rng, num_classes)
    y_train = rng.permutation(np.arange(train_size) % num_classes).astype(np.int64)
    y_test = rng.permutation(np.arange(test_size) % num_classes).astype(np.int64)
    x_train = _images(rng, templates, y_train, noise)
    x_test = _images(rng, templates, y_test, noise)
    logger.info(
        "dataset %s (GENERATED, not CIFAR-10): %d train, %d test, seed %d",
        SYNTHETIC_CIFAR_NAME,
        train_size,
        test_size,
        seed,
    )
    return Dataset(
        name=SYNTHETIC_CIFAR_NAME,
        generated=True,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
    )


def xor_dataset(*, repeats: int = 4) -> Dataset:
    """The four XOR points, repeated ``repeats`` times for training; tested on the four."""
    return Dataset(
        name=XOR_NAME,
        generated=True,
        x_train=np.tile(XOR_POINTS, (repeats, 1)),
        y_train=np.tile(XOR_LABELS, repeats),
        x_test=XOR_POINTS.copy(),
        y_test=XOR_LABELS.copy(),
        num_classes=2,
    )


def hello_vectors(
    *,
    size: int,
    train_size: int = 4_000,
    test_size: int = 400,
    num_clusters: int = 10,
    spread: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """Points in ``size`` dimensions around ``num_clusters`` centres; label = cluster.

    For hello-mobile a device's points define its target (their mean), so a
    label-skewed partition gives devices different targets.
    """
    rng = np.random.default_rng([seed, 0x4E11])
    centres = rng.normal(size=(num_clusters, size)).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % num_clusters).astype(np.int64)
        noise = rng.normal(0.0, spread, size=(n, size)).astype(np.float32)
        return centres[labels] + noise, labels

    x_train, y_train = draw(train_size)
    x_test, y_test = draw(test_size)
    return Dataset(
        name=HELLO_NAME,
        generated=True,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_clusters,
    )
