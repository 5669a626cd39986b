"""rings-mobile: is a point inside the unit circle? A user's job in one file.

Each of 60 app users contributes points from their own part of the plane (a
home direction, with spread), so the data is naturally split by user and no
two phones see the same distribution: ``PartitionScheme(kind="natural")``
gives each simulated phone one user's points. The data is generated and says
so (``generated=True``, name ``generated-rings``).

Run it (docs/custom-job.md, "Run it"):

    canopy parity docs/examples/rings.py:RINGS
    canopy up --jobs docs/examples/rings.py:RINGS
    canopy deploy docs/examples/rings.py:RINGS
    prefect deployment run federated-training/rings-mobile --watch
    canopy report rings-mobile
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edge.data import Dataset, DatasetConfig, PartitionScheme
from edge.jobs import JobSpec, TrainHyperparams

USERS = 60


class Ring(nn.Module):
    """2 -> 32 -> 32 (ReLU) -> 2 logits, 1,218 parameters: enough to bend a circle."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 2) logits


def rings(config: DatasetConfig, *, store: object = None) -> Dataset:
    """Points of ``USERS`` users, each around their own direction; label: outside r=1."""
    del store  # generated data: nothing to read
    rng = np.random.default_rng([config.seed, 0x5196])
    home = rng.uniform(0, 2 * np.pi, USERS)  # each user's direction
    per_user = rng.integers(40, 120, USERS)  # users contribute unequal amounts

    def draw(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        owners = np.repeat(np.arange(USERS), counts)
        angle = home[owners] + rng.normal(0.0, 0.8, owners.size)
        radius = np.sqrt(rng.uniform(0.0, 4.0, owners.size))  # uniform over the disc r < 2
        x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1).astype(np.float32)
        return x, (radius > 1.0).astype(np.int64), owners

    x, y, owners = draw(per_user)
    x_test, y_test, test_owners = draw(np.maximum(per_user // 4, 1))
    return Dataset(
        name="generated-rings",
        generated=True,
        x_train=x,
        y_train=y,
        x_test=x_test,
        y_test=y_test,
        num_classes=2,
        train_owners=owners,
        test_owners=test_owners,
    )


RINGS = JobSpec(
    name="rings-mobile",
    description="Inside or outside the unit circle; each phone holds one user's points.",
    input_shape=(2,),
    num_classes=2,
    dataset=rings,
    model=Ring,
    hyperparams=TrainHyperparams(local_epochs=5, batch_size=8, lr=0.05, momentum=0.9),
    partition=PartitionScheme(kind="natural", min_size=16),
)
