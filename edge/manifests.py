"""Round manifests: what the round flow writes to S3 and the gateways read.

Gateways hold no state of their own. Everything they need to answer a device
comes from three kinds of small JSON objects, all pure pydantic models here:

* ``ActiveRound`` at ``control/active/{job}.json`` (``infra.keys.active_job_key``):
  which run and round of a job the gateways serve, what its tasks ask
  (``kind``: ``train``, or ``evaluate`` for a federated evaluation), the leaves
  of the round's aggregation tree and where each leaf's task manifest lives.
  The flow rewrites it when a round (or its evaluation) opens
  (``status="open"``), when it closes (``"closed"``) and when the job ends
  (``"done"``).
* ``LeafTask`` at ``{job}/{run}/round-{r:05d}/tasks/{leaf}.json``
  (``infra.keys.task_manifest_key``; ``evaluation_task_key`` for evaluation
  tasks): the work of one leaf for one round.
* ``DeviceRecord`` at ``devices/{job}/{device_id}.json`` (``infra.keys.device_key``):
  written by a gateway when a device enrols for a job; the flow samples each
  round's cohort by listing ``infra.keys.registry_prefix(job)`` (keys only, no GETs).

Write them with ``infra.store.put_json(store, key, model, kind=...)`` using the
``KIND_*`` constants, read them with ``get_json`` plus ``Model.model_validate``.
No I/O happens in this module.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aggregation.tensors import TensorSpec
from infra.keys import DEVICES_PREFIX as DEVICES_PREFIX
from infra.keys import check_segment
from infra.keys import device_key as device_key
from infra.keys import registry_prefix as registry_prefix
from infra.store import ObjectRef

Runtime = Literal["executorch", "pytorch"]
"""How a device trains: an ExecuTorch training program (.pte) or eager PyTorch."""

RUNTIMES: tuple[Runtime, ...] = ("executorch", "pytorch")

RoundStatus = Literal["open", "closed", "done"]
TaskStatus = Literal["open", "closed"]

WorkKind = Literal["train", "evaluate"]
"""What a task asks of a device: ``train`` (upload an update) or ``evaluate`` (evaluate
the global model on the device's own held-out data and upload metrics only)."""

WORK_KINDS: tuple[WorkKind, ...] = ("train", "evaluate")

KIND_ACTIVE_ROUND = "active-round"
KIND_LEAF_TASK = "leaf-task"
KIND_DEVICE_RECORD = "device-record"
KIND_DEVICE_IDENTITY = "device-identity"

IDENTITIES_PREFIX = "identities/"

MAX_NUM_SAMPLES = 1_000_000_000
"""Hard cap on the sample count (aggregation weight) any device may claim for an update."""


def identity_key(device_id: str) -> str:
    """Where the key a device id is bound to lives: ``identities/{device_id}.json``.

    One per device id, not per job: the token a device gets is valid for every
    job, so the binding must be too (a per-job binding would let anyone enrol a
    known id for a job it never joined and act as that device everywhere).
    """
    return f"{IDENTITIES_PREFIX}{check_segment(device_id, 'device id')}.json"


def make_task_id(job: str, run_id: str, rnd: int, leaf: str, kind: WorkKind = "train") -> str:
    """A task id that names its job, run, round, leaf (and ``eval`` for evaluation tasks).

    Gateways never parse task ids; they only compare them with the current
    ``LeafTask.task_id``. Any unique string works, this is the convention.
    """
    phase = "eval." if kind == "evaluate" else ""
    return f"{job}.{run_id}.r{rnd:05d}.{phase}{leaf}"


def _aware(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (e.g. datetime.now(UTC)), got {value}")
    return value


class ActiveRound(BaseModel):
    """Which round of a job gateways serve; the one pointer the flow moves.

    ``status`` drives every gateway answer:

    * ``open``: devices selected in a leaf's ``LeafTask`` get that task;
    * ``closed``: the flow stopped collecting (aggregating, or between rounds);
      uploads are refused as late (409) and polls are told to retry after
      ``poll_seconds``;
    * ``done``: the job is finished; polls answer ``done`` and devices stop.

    ``kind`` says what the open tasks ask: a round's training (``train``), or
    its federated evaluation (``evaluate``), which reopens the same round
    number with evaluation tasks after the training closed. Uploads and the
    close fence compare it too, so a late update can never land in an
    evaluation nor an evaluation result in training.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    job: str
    run_id: str
    round: int = Field(ge=0)
    status: RoundStatus
    kind: WorkKind = Field(
        default="train", description="train: the round's training; evaluate: its evaluation."
    )
    leaves: list[str] = Field(
        min_length=1, description="Leaf node names; devices map onto them by leaf_for_device."
    )
    leaf_manifest_keys: dict[str, str] = Field(
        description="leaf name -> S3 key of its LeafTask (task_manifest_key(...))."
    )
    opened_at: datetime
    closed_at: datetime | None = None
    poll_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How soon a device should ask again while a round is not open for it.",
    )
    idle_poll_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How soon a device that was not selected (or already reported) asks again.",
    )

    @field_validator("job", "run_id")
    @classmethod
    def _segment(cls, value: str) -> str:
        return check_segment(value, "job or run id")

    @field_validator("opened_at", "closed_at")
    @classmethod
    def _tz(cls, value: datetime | None) -> datetime | None:
        return None if value is None else _aware(value, "opened_at/closed_at")

    @model_validator(mode="after")
    def _leaves_have_manifests(self) -> ActiveRound:
        if len(set(self.leaves)) != len(self.leaves):
            raise ValueError(f"leaves must be unique, got {self.leaves}")
        for leaf in self.leaves:
            check_segment(leaf, "leaf")
        missing = [leaf for leaf in self.leaves if leaf not in self.leaf_manifest_keys]
        if missing:
            raise ValueError(f"leaf_manifest_keys has no entry for leaves {missing}")
        return self


class DataHint(BaseModel):
    """SIMULATION ONLY: how a simulated device finds its own slice of the dataset.

    Real phones train on their own data and ignore this. The simulator passes
    it, with the device's index, to ``edge.data.device_partition`` so that
    every simulated device trains on a fixed, reproducible partition.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    scheme: str = Field(description="Partition scheme, e.g. 'iid', 'dirichlet', 'shards'.")
    num_devices: int = Field(ge=1, description="Number of partitions the data is split into.")
    seed: int = Field(default=0, description="Seed of the partitioning.")
    alpha: float | None = Field(default=None, gt=0, description="Dirichlet concentration.")
    shards: int | None = Field(default=None, ge=1, description="Shards per device.")
    holdout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Fraction of each device's partition held out for federated evaluation "
        "(never trained on); 0 when the run does not evaluate on devices.",
    )


class LeafTask(BaseModel):
    """The work of one leaf for one round: who trains (or evaluates), on which model, how.

    An ``evaluate`` task has no program (devices evaluate the safetensors
    weights) and names the ``metrics`` every result must report.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: str = Field(min_length=1, max_length=256)
    job: str
    run_id: str
    round: int = Field(ge=0)
    leaf: str
    kind: WorkKind = Field(
        default="train",
        description="train: upload an update; evaluate: upload the metrics of the global model "
        "on the device's own held-out data, and no update.",
    )
    metrics: list[str] = Field(
        default_factory=list,
        description="evaluate: the metric names every result must report, exactly (the job's).",
    )
    selected_device_ids: list[str] = Field(
        description="Devices of this leaf asked to train (each has leaf_for_device == leaf)."
    )
    model_version: str = Field(description="sha256 of the global model; uploads must echo it.")
    global_model: ObjectRef = Field(description="The round's global.safetensors.")
    program: ObjectRef | None = Field(
        default=None,
        description=(
            "The round's ExecuTorch training program (.pte). None for jobs without a network "
            "(closed-form jobs such as hello-mobile), which every runtime trains from the weights."
        ),
    )
    tensor_spec: dict[str, tuple[list[int], str]] = Field(
        description="name -> [shape, dtype] every update must match exactly."
    )
    hyperparams: dict[str, Any] = Field(default_factory=dict)
    runtime: Runtime
    deadline: datetime = Field(description="Uploads received after this are late (409).")
    status: TaskStatus = "open"
    data_hint: DataHint | None = Field(
        default=None, description="SIMULATION ONLY: partition of simulated devices."
    )
    max_num_samples: int | None = Field(
        default=None,
        ge=1,
        le=MAX_NUM_SAMPLES,
        description=(
            "The largest sample count (aggregation weight) a device of this leaf may claim; "
            "gateways refuse larger X-Canopy-Num-Samples with 422 too_many_samples. Set it from "
            "what the job knows (the largest partition of the selected devices, times the "
            "epochs if the device counts examples per epoch). None: only the hard cap "
            "MAX_NUM_SAMPLES applies."
        ),
    )

    @field_validator("job", "run_id", "leaf")
    @classmethod
    def _segment(cls, value: str) -> str:
        return check_segment(value, "job, run id or leaf")

    @field_validator("deadline")
    @classmethod
    def _tz(cls, value: datetime) -> datetime:
        return _aware(value, "deadline")

    @model_validator(mode="after")
    def _consistent(self) -> LeafTask:
        if self.model_version != self.global_model.sha256:
            raise ValueError(
                f"model_version {self.model_version[:12]} must be the global model's sha256 "
                f"{self.global_model.sha256[:12]}"
            )
        if not self.tensor_spec:
            raise ValueError("tensor_spec is empty; every update would be refused")
        if self.kind == "evaluate" and (self.program is not None or not self.metrics):
            raise ValueError(
                "an evaluate task names the metrics to report and has no program "
                "(devices evaluate the safetensors weights)"
            )
        return self

    def sample_limit(self) -> int:
        """The largest ``X-Canopy-Num-Samples`` an upload for this task may carry."""
        return MAX_NUM_SAMPLES if self.max_num_samples is None else self.max_num_samples

    def specs(self) -> dict[str, TensorSpec]:
        """The tensor spec as ``aggregation.tensors.TensorSpec`` values."""
        return {
            name: TensorSpec(tuple(shape), dtype)
            for name, (shape, dtype) in self.tensor_spec.items()
        }


class DeviceRecord(BaseModel):
    """A device in the registry of one job, written by the gateway that enrolled it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: str
    job: str
    runtimes: list[Runtime] = Field(min_length=1, description="Runtimes the device can train with.")
    platform: str | None = Field(default=None, max_length=64)
    app_version: str | None = Field(default=None, max_length=64)
    enrolled_at: datetime
    gateway_id: str

    @field_validator("device_id", "job")
    @classmethod
    def _segment(cls, value: str) -> str:
        return check_segment(value, "device id or job")


class DeviceIdentity(BaseModel):
    """The key a device id is bound to: trust on first use, proved at every enrolment.

    Written by the gateway that enrolled the id first; never rewritten by a
    gateway. An operator resets a device that lost its key (a reinstalled app)
    by deleting the object; its next enrolment binds the new key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: str
    algorithm: Literal["ed25519"] = "ed25519"
    public_key: str = Field(description="Raw 32-byte public key, base64url without padding.")
    bound_at: datetime
    gateway_id: str

    @field_validator("device_id")
    @classmethod
    def _segment(cls, value: str) -> str:
        return check_segment(value, "device id")

    @field_validator("bound_at")
    @classmethod
    def _tz(cls, value: datetime) -> datetime:
        return _aware(value, "bound_at")
