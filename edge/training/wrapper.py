"""The module that is exported and trained: the job's network plus its loss.

ExecuTorch's training programs compute the loss in the program and need it as
the first output; the second output (arg-max predictions) gives accuracy
without a second pass. The eager trainer runs the very same module, so both
runtimes compute identical graphs, which is what parity compares.
"""

from __future__ import annotations

import torch
from torch import nn

from edge.jobs.spec import LossFn

# Prefix of the wrapped network's names inside the wrapper; stripped to get the
# network's own state_dict names back.
MODEL_PREFIX = "model."


class LossAndPredictions(nn.Module):
    """``(x, y) -> (loss scalar, predicted class (B,) int64)``."""

    def __init__(self, model: nn.Module, loss: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)  # (B, num_classes)
        return self.loss_fn(logits, y), logits.detach().argmax(dim=1)


def network_name(program_name: str) -> str:
    """``model.conv1.weight`` (as ExecuTorch names it) -> ``conv1.weight``."""
    return program_name.removeprefix(MODEL_PREFIX)
