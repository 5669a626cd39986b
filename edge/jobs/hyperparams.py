"""What a round tells devices about training, without importing torch.

Kept apart from ``edge.jobs.spec`` (which needs torch for models and losses) so
the flow's parameter model, round planning and the edge pool's leaf workers,
which only carry these values, start without loading torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RuntimeName = Literal["executorch", "pytorch"]
ALL_RUNTIMES: frozenset[RuntimeName] = frozenset({"executorch", "pytorch"})

TaskKind = Literal["classification", "regression"]
TASK_METRICS: dict[TaskKind, tuple[str, ...]] = {
    "classification": ("loss", "accuracy"),
    "regression": ("loss", "mse", "mae"),
}


class TrainHyperparams(BaseModel):
    """Local training hyperparameters a round sends to its devices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    local_epochs: int = Field(default=1, ge=1, le=1000, description="Passes over local data.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Stop after this many optimizer steps even if epochs remain (None: no cap).",
    )
    batch_size: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Examples per step. ExecuTorch programs are exported for one batch size.",
    )
    lr: float = Field(default=0.05, gt=0, le=10, allow_inf_nan=False, description="SGD step size.")
    momentum: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="SGD momentum; the buffer carries across every batch of the local training.",
    )
