"""What one leaf's collection hands to the round: its partial's reference and its counts.

Apart from ``tasks.results`` because an edge worker's leaf run
(``flows.edge_leaf``) writes it to S3 and must import little: pydantic and the
norm histogram, no planner, no job registry, no torch.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from aggregation.clipping import LeafNorms
from aggregation.norms import NormHistogram
from infra.store import ObjectRef


class LeafOutcome(BaseModel):
    """What one leaf contributed: its partial in S3 and the intake counts."""

    model_config = ConfigDict(frozen=True)

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
