"""What each step of a round hands to the next: references, counts and when it ran.

Pure pydantic models, no I/O. Tasks return them, the flow passes them on, and
``tasks.reporting`` turns them into the round's report. ``started_at`` and
``finished_at`` are wall-clock seconds (``time.time()``), so the phase timings
of a round can be told from its results wherever each step ran.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aggregation.clipping import LeafNorms, NormBoundState
from aggregation.norms import NormHistogram
from infra.store import ObjectRef
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


class LeafOutcome(_Result):
    """What one leaf contributed: its partial in S3 and the intake counts."""

    leaf: str
    partial: ObjectRef
    reported: int
    rejected: dict[str, int]
    rejection_examples: dict[str, str]
    clipped: dict[str, int] = Field(default_factory=dict)
    norm_bound: float | None = Field(default=None, description="The bound in force at the end.")
    norms: dict[str, int] = Field(
        default_factory=dict,
        description="Histogram of the norms the leaf summed (aggregation.norms.NormHistogram, "
        "to_json), for round 0's check across leaves.",
    )
    warmup_reference: float | None = Field(
        default=None, description="Round 0: the norm the leaf's warm-up bound is a multiple of."
    )
    largest_norm: float = Field(
        default=0.0, description="The largest norm of an update as the leaf summed it."
    )
    duplicates: int
    batches: int
    bytes_in: int
    finished_at: float

    def norm_summary(self) -> LeafNorms:
        """What round 0's check across leaves knows of this leaf."""
        return LeafNorms(
            norms=NormHistogram.from_json(self.norms, source=self.partial.uri),
            reference=self.warmup_reference,
            largest=self.largest_norm,
        )


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
