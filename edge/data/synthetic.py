"""Generated datasets: CIFAR-shaped images with real class structure, XOR, hello vectors.

Generated data is always named as such (``synthetic-cifar10-shaped``), so a log,
a round report or a benchmark can never pass it off as CIFAR-10. The images have
learnable structure: each class owns a random low-frequency colour pattern, and
every example is that pattern with random contrast and brightness, plus its own
random low-frequency pattern and pixel noise. A LeNet rises well above chance
(10%) within one epoch and levels off well below 100%, much as on CIFAR-10.
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


# Amplitudes on the 0..255 scale. The class signal lives in a coarse 4x4 colour
# pattern; each example adds its own coarse pattern (same subspace, so classes
# overlap and no model can be perfect) and fine pixel noise. With these values a
# LeNet trained on 5,000 examples reaches roughly 35-40% after one epoch and
# levels off near 55%: CIFAR-like difficulty, not a solved toy.
_CLASS_PATTERN = 12.0
_CLASS_COLOUR = 10.0
_EXAMPLE_PATTERN = 48.0
_PIXEL_NOISE = 30.0
_BRIGHTNESS = 8.0
_CHUNK = 4096  # images generated at a time, bounding float64 scratch memory to ~100 MB


def _coarse(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random 3x4x4 patterns upsampled to 3x32x32 blocks: (n, 3, 32, 32)."""
    return np.kron(rng.normal(size=(n, 3, 4, 4)), np.ones((1, 1, 8, 8)))


def _class_templates(rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """One (3, 32, 32) template per class, centred on 0."""
    colour = rng.normal(size=(num_classes, 3, 1, 1))  # (C, 3, 1, 1) mean colour per class
    return _CLASS_PATTERN * _coarse(rng, num_classes) + _CLASS_COLOUR * colour


def _images(rng: np.random.Generator, templates: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = np.empty((labels.shape[0], 3, 32, 32), dtype=np.uint8)
    for start in range(0, labels.shape[0], _CHUNK):
        chunk = labels[start : start + _CHUNK]
        n = chunk.shape[0]
        contrast = rng.uniform(0.6, 1.4, size=(n, 1, 1, 1))
        brightness = rng.normal(0.0, _BRIGHTNESS, size=(n, 1, 1, 1))
        own = _EXAMPLE_PATTERN * _coarse(rng, n)
        pixels = rng.normal(0.0, _PIXEL_NOISE, size=(n, 3, 32, 32))
        images = 128.0 + contrast * templates[chunk] + own + brightness + pixels
        out[start : start + n] = np.clip(np.rint(images), 0, 255)
    return out


def synthetic_cifar10_shaped(
    *, train_size: int = 50_000, test_size: int = 10_000, seed: int = 0
) -> Dataset:
    """Generated 3x32x32 ``uint8`` images in 10 balanced classes, reproducible from ``seed``."""
    rng = np.random.default_rng([seed, 0xC1FA])
    num_classes = 10
    templates = _class_templates(rng, num_classes)
    y_train = rng.permutation(np.arange(train_size) % num_classes).astype(np.int64)
    y_test = rng.permutation(np.arange(test_size) % num_classes).astype(np.int64)
    x_train = _images(rng, templates, y_train)
    x_test = _images(rng, templates, y_test)
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
