"""A run's committed state in S3: the commit pointer and per-round reports.

``commit.json`` is written last when a round finishes, in one PUT, so a reader
(a resumed flow, ``canopy report``, a gateway) either sees the previous round's
state or the new one, never half of a round. Resuming a run means reading this
pointer and starting at ``next_round``: no round is applied twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infra.errors import ObjectNotFoundError
from infra.keys import commit_key, round_report_key
from infra.store import ObjectRef, ObjectStore, get_json, put_json

RoundOutcome = Literal["committed", "abandoned"]


class RoundReport(BaseModel):
    """What happened in one round: the row of the round table and of ``canopy report``."""

    model_config = ConfigDict(frozen=True)

    round: int
    outcome: RoundOutcome
    reason: str = ""
    devices_selected: int
    devices_reported: int
    rejected: dict[str, int] = Field(default_factory=dict)
    clipped: dict[str, int] = Field(
        default_factory=dict,
        description="Updates scaled down to a norm bound, per reason: norm-bound (the run's "
        "explicit bound), adaptive-norm (a leaf's adaptive bound), adaptive-norm-round (round "
        "0's check across leaves, which scales a leaf calibrated by outsized updates to the "
        "round's bound). An update clipped at its leaf and again by the round counts twice.",
    )
    median_norm: float | None = Field(
        default=None, description="Median L2 norm of the round's accepted updates (pre-clip)."
    )
    norm_bound: float | None = Field(
        default=None, description="Adaptive norm bound the next round starts from."
    )
    duplicates: int = 0
    late: int = 0
    train_loss: float | None = None
    train_accuracy: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    eval_dataset: str | None = None
    train_metrics: dict[str, float] = Field(
        default_factory=dict,
        description="The job's metrics averaged over reporting devices (weighted by samples).",
    )
    test_metrics: dict[str, float] = Field(
        default_factory=dict,
        description="The job's metrics of the new global model on held-out data: accuracy and "
        "loss for classification, mse, mae and loss for regression.",
    )
    device_metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Federated evaluation (rounds with eval_every): the job's metrics of the "
        "new global model measured by devices on their own held-out data, summed over "
        "devices and divided once. Empty when the round did not evaluate on devices.",
    )
    devices_evaluated: int = Field(
        default=0, description="Devices whose evaluations were summed into device_metrics."
    )
    device_eval_samples: int = Field(
        default=0, description="Held-out examples those devices evaluated."
    )
    bytes_in: int = 0
    bytes_out: int = 0
    duration_s: float
    timings: dict[str, float] = Field(
        default_factory=dict,
        description="Seconds per phase: export, dispatch, devices (waiting for reports), "
        "close-and-collect, aggregate, evaluate; and device-evaluation (the federated "
        "evaluation, which runs beside evaluate) when the round had one.",
    )
    marks: dict[str, float] = Field(
        default_factory=dict,
        description="When the round reached each step (Unix seconds): start (it had its "
        "model), opened, closed, collected (every leaf done), model (the root's new model: "
        "the next round may open from here), evaluated. Rounds overlap (docs/orchestration.md, "
        "'Pipelined rounds'), so the next round's opened minus this round's model is the "
        "hand-over between them.",
    )
    global_model: ObjectRef
    program: ObjectRef | None = None
    flow_run_id: str | None = None
    finished_at: datetime


class CommitRecord(BaseModel):
    """The pointer to a run's newest committed global model."""

    model_config = ConfigDict(frozen=True)

    job: str
    run_id: str
    next_round: int = Field(ge=0, description="The round a resumed run starts with.")
    global_model: ObjectRef
    server_state: ObjectRef | None = None
    norm_bound: dict[str, Any] | None = Field(
        default=None,
        description="The adaptive norm bound's state (aggregation.clipping.NormBoundState); "
        "None before the first committed round.",
    )
    reports: list[ObjectRef] = Field(default_factory=list)
    updated_at: datetime


def read_commit(store: ObjectStore, job: str, run_id: str) -> CommitRecord | None:
    try:
        return CommitRecord.model_validate(get_json(store, commit_key(job, run_id)))
    except ObjectNotFoundError:
        return None


def write_commit(store: ObjectStore, record: CommitRecord) -> ObjectRef:
    return put_json(store, commit_key(record.job, record.run_id), record, kind="commit")


def write_report(store: ObjectStore, job: str, run_id: str, report: RoundReport) -> ObjectRef:
    return put_json(store, round_report_key(job, run_id, report.round), report, kind="report")


def read_reports(store: ObjectStore, commit: CommitRecord) -> list[RoundReport]:
    return [
        RoundReport.model_validate(get_json(store, ref.key, expected_sha256=ref.sha256))
        for ref in commit.reports
    ]
