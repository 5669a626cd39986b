"""cifar10-mobile: a LeNet-style CNN on CIFAR-10, each device its own partition.

LeNet keeps its max-pooling: that is exactly the layer whose ExecuTorch backward
kernel is broken upstream (see ``edge.training.export``), so this job is what
proves the workaround.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from edge.data.partition import PartitionScheme
from edge.data.sources import load_image_dataset
from edge.jobs.spec import JobSpec, TrainHyperparams


class LeNet(nn.Module):
    """LeNet-5 with max-pooling, 62,006 parameters.

    conv(3->6, 5) relu maxpool2, conv(6->16, 5) relu maxpool2, fc 400->120->84->10.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, kernel_size=5)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 6, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 16, 5, 5)
        x = torch.flatten(x, 1)  # (B, 400)
        x = F.relu(self.fc1(x))  # (B, 120)
        x = F.relu(self.fc2(x))  # (B, 84)
        return self.fc3(x)  # (B, num_classes)


CIFAR10_MOBILE = JobSpec(
    name="cifar10-mobile",
    description="LeNet-5 style CNN with max-pooling on CIFAR-10 (or generated CIFAR-shaped data).",
    input_shape=(3, 32, 32),
    num_classes=10,
    dataset=load_image_dataset,
    model=LeNet,
    hyperparams=TrainHyperparams(local_epochs=1, batch_size=32, lr=0.01, momentum=0.9),
    partition=PartitionScheme(kind="dirichlet", alpha=0.5, min_size=32),
)
