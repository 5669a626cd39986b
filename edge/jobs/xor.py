"""xor-mobile: a tiny MLP learning XOR, the smallest job with a real network.

Every device holds the same four points (repeated), so FedAvg over a handful of
devices reaches 100% accuracy in a few rounds; it checks the whole network path
(export, ExecuTorch training, aggregation) in seconds.
"""

from __future__ import annotations

import torch
from torch import nn

from edge.data.config import DatasetConfig
from edge.data.dataset import Dataset
from edge.data.errors import DatasetUnavailableError
from edge.data.partition import PartitionScheme
from edge.data.synthetic import xor_dataset
from edge.jobs.spec import JobSpec, TrainHyperparams
from infra.store import ObjectStore

HIDDEN = 16


class XorMLP(nn.Module):
    """2 -> 16 (tanh) -> 2 logits."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))  # (B, 2)


def _dataset(config: DatasetConfig, *, store: ObjectStore | None = None) -> Dataset:
    del store
    if config.source != "synthetic":
        raise DatasetUnavailableError(
            f"xor-mobile trains on the XOR truth table only; source {config.source!r} "
            "does not apply (use source=synthetic)"
        )
    return xor_dataset(repeats=4)


XOR_MOBILE = JobSpec(
    name="xor-mobile",
    description="2-16-2 tanh MLP learning XOR from the 4-point table on every device.",
    input_shape=(2,),
    num_classes=2,
    dataset=_dataset,
    model=XorMLP,
    hyperparams=TrainHyperparams(local_epochs=10, batch_size=4, lr=0.2, momentum=0.9),
    partition=PartitionScheme(kind="full"),
)
