"""What each step of a round hands to the next: references, counts and when it ran.

Pure pydantic models, no I/O. Tasks return them, the flow passes them on, and
``tasks.reporting`` turns them into the round's report. ``started_at`` and
``finished_at`` are wall-clock seconds (``time.time()``), so the phase timings
of a round can be told from its results wherever each step ran.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aggregation.clipping import NormBoundState
from infra.store import ObjectRef
from tasks.leaf_outcome import LeafOutcome  # apart: edge workers import it, light
from tasks.planning import CloseReason, OpenedRound


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)


class ProgramExport(_Result):
    """The round's ExecuTorch training program in S3."""

    ref: ObjectRef
    method: str = Field(description="template-weights-patched, or full-export.")
    started_at: float
    finished_at: float


class Closing(_Result):
    """How the round stopped waiting for reports."""

    reason: CloseReason
    reports_seen: int = Field(description="Uploads in S3 when the round closed (from key names).")
    closed_at: float


class LeafLevel(_Result):
    """The leaf level of a round: how it closed and every leaf's outcome."""

    closing: Closing
    leaves: list[LeafOutcome]

    @property
    def partials(self) -> dict[str, ObjectRef]:
        return {o.leaf: o.partial for o in self.leaves}

    @property
    def finished_at(self) -> float:
        return max([self.closing.closed_at, *(o.finished_at for o in self.leaves)])


class RootResult(_Result):
    """The root's outcome: the new global model (None when abandoned) and training metrics."""

    devices: int
    weight: float
    train_metrics: dict[str, float]
    global_model: ObjectRef | None = None
    server_state: ObjectRef | None = None
    root_partial: ObjectRef
    median_norm: float | None = None
    norm_state: NormBoundState | None = Field(
        default=None, description="The adaptive bound's state for the next round (if committed)."
    )
    finished_at: float


class Evaluation(_Result):
    """Held-out metrics of a global model, and which data they were measured on."""

    metrics: dict[str, float]
    dataset: str
    samples: int
    ref: ObjectRef
    started_at: float
    finished_at: float


class EvaluationLeaf(_Result):
    """What one leaf's devices reported in a federated evaluation.

    ``sums`` is ``aggregation.evaluation.EvaluationSums.to_json()``: devices,
    examples and per-metric ``[sum, weight]``, never means.
    """

    leaf: str
    sums: dict[str, Any]
    rejected: dict[str, int]
    rejection_examples: dict[str, str]
    duplicates: int
    batches: list[ObjectRef]
    finished_at: float


class DeviceEvaluation(_Result):
    """A round's federated evaluation: the job's metrics of the new global model, measured by
    devices on their own held-out data, summed over the devices and divided once."""

    metrics: dict[str, float]
    devices: int = Field(description="Devices whose results were summed.")
    samples: int = Field(description="Held-out examples they evaluated.")
    selected: int
    rejected: dict[str, int]
    ref: ObjectRef
    started_at: float
    finished_at: float


class RoundResults(_Result):
    """Everything a round's steps produced, in the order they ran: the report's input."""

    program: ProgramExport | None
    opened: OpenedRound
    level: LeafLevel
    root: RootResult
    evaluation: Evaluation | None
    device_evaluation: DeviceEvaluation | None = None
    handed_at: float | None = Field(
        default=None, description="When the next round was handed the new model (pipelining)."
    )
