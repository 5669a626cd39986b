"""The module that is exported and trained: the job's network plus its loss.

ExecuTorch's training programs compute the loss in the program and need it as
the first output; the second output gives the metrics without a second pass:
the arg-max class for classification, the predicted values for regression
(``edge.training.metrics`` turns either into sums). The eager trainer and the
server's evaluation run the very same module, so every runtime computes
identical graphs, which is what parity compares.
"""

from __future__ import annotations

import torch
from torch import nn

from edge.jobs.spec import LossFn, TaskKind

# Prefix of the wrapped network's names inside the wrapper; stripped to get the
# network's own state_dict names back.
MODEL_PREFIX = "model."


class LossAndPredictions(nn.Module):
    """``(x, y) -> (loss scalar, predictions)``.

    Predictions are the class per example, ``(B,)`` ``int64``, for
    classification, and the network's outputs, ``(B, *target_shape)``, detached,
    for regression.
    """

    def __init__(self, model: nn.Module, loss: LossFn, task: TaskKind = "classification") -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss
        self.task = task

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(x)  # (B, num_classes) logits, or (B, *target_shape) values
        if self.task == "regression":
            return self.loss_fn(outputs, y), outputs.detach()
        return self.loss_fn(outputs, y), outputs.detach().argmax(dim=1)


def network_name(program_name: str) -> str:
    """``model.conv1.weight`` (as ExecuTorch names it) -> ``conv1.weight``."""
    return program_name.removeprefix(MODEL_PREFIX)
