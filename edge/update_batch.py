"""Group-committed device updates: many devices' updates in one safetensors object.

A local S3 (moto) handles a few hundred requests per second and real S3 bills
per request, so gateways do not write one object per device. Updates accepted
for the same (job, run, round, leaf) within a few milliseconds are written as
one object at ``infra.keys.update_batch_key(...)``:

* tensor ``f"{i}/{name}"`` is tensor ``name`` of the i-th device update in the
  batch (split on the first ``/``, so parameter names may contain ``/``);
* safetensors metadata ``canopy-update-batch`` is the format version and
  ``records`` a JSON list, one record per device, in order ``i = 0, 1, ...``:
  ``device_id, task_id, model_version, num_samples, metrics, received_at,
  gateway_id``. ``job``, ``run_id``, ``round``, ``leaf`` and ``gateway_id``
  describe the whole batch.

Evaluation results (``kind`` ``evaluate``, docs/orchestration.md) travel the
same way, at ``infra.keys.evaluation_batch_key(...)``: metadata ``kind`` is
``evaluate`` and the records carry metrics and no tensors (the batch holds no
tensors at all). A batch without ``kind`` is a training batch.

``decode_update_batch`` is what the leaf aggregation calls. It checks the
structure (every record has tensors, every tensor has a record) but not the
tensor spec or finiteness: gateways already refused bad updates, and the flow
re-checks each update with ``aggregation.guards`` before summing. Different
gateways may write the same device's update twice (a retry that reached another
gateway), so callers de-duplicate by ``device_id``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aggregation.tensors import TensorDict, decode_tensors, encode_tensors
from edge.manifests import WORK_KINDS, WorkKind
from infra.errors import ValidationError
from infra.keys import evaluation_batch_key, update_batch_key

BATCH_FORMAT = "1"
KIND_UPDATE_BATCH = "device-update-batch"


@dataclass(frozen=True)
class DeviceUpdate:
    """One device's accepted update for one task (``tensors`` = new - old).

    An evaluation result is a ``DeviceUpdate`` without tensors: ``num_samples``
    held-out examples and the ``metrics`` measured on them.
    """

    device_id: str
    task_id: str
    model_version: str
    num_samples: int
    tensors: TensorDict
    metrics: Mapping[str, float] = field(default_factory=dict)
    received_at: datetime | None = None
    gateway_id: str = ""

    def record(self) -> dict[str, Any]:
        """The JSON record stored for this update in a batch's metadata."""
        return {
            "device_id": self.device_id,
            "task_id": self.task_id,
            "model_version": self.model_version,
            "num_samples": self.num_samples,
            "metrics": dict(self.metrics),
            "received_at": self.received_at.isoformat() if self.received_at else None,
            "gateway_id": self.gateway_id,
        }


@dataclass(frozen=True)
class BatchContext:
    """Where a batch belongs: the same for every update in it."""

    job: str
    run_id: str
    round: int
    leaf: str
    gateway_id: str
    kind: WorkKind = "train"


def batch_key(context: BatchContext, batch: str) -> str:
    """Where a batch of this context lives: the round's updates, or its evaluation results."""
    key = update_batch_key if context.kind == "train" else evaluation_batch_key
    return key(context.job, context.run_id, context.round, context.leaf, batch)


def encode_update_batch(updates: Sequence[DeviceUpdate], context: BatchContext) -> bytes:
    """Serialise updates (at least one) as one safetensors object.

    Training updates must each hold tensors; evaluation results must hold none.
    """
    if not updates:
        raise ValueError("an update batch needs at least one update")
    tensors: TensorDict = {}
    for i, update in enumerate(updates):
        if bool(update.tensors) != (context.kind == "train"):
            raise ValueError(
                f"{context.kind} result of device {update.device_id!r} "
                + ("has no tensors" if context.kind == "train" else "carries tensors")
            )
        for name, array in update.tensors.items():
            tensors[f"{i}/{name}"] = array
    metadata = {
        "canopy-update-batch": BATCH_FORMAT,
        "kind": context.kind,
        "job": context.job,
        "run_id": context.run_id,
        "round": str(context.round),
        "leaf": context.leaf,
        "gateway_id": context.gateway_id,
        "records": json.dumps([u.record() for u in updates], separators=(",", ":")),
    }
    return encode_tensors(tensors, metadata)


def decode_update_batch(data: bytes, source: str) -> list[DeviceUpdate]:
    """Parse a batch written by ``encode_update_batch``; ``source`` names it in errors.

    Raises ``infra.errors.ValidationError`` when the bytes are not a well-formed
    batch (not safetensors, wrong format version, records that do not match the
    tensors). Updates come back in the order they were written.
    """
    tensors, metadata = decode_tensors(data, source=source)
    version = metadata.get("canopy-update-batch")
    if version != BATCH_FORMAT:
        raise ValidationError(
            f"{source}: update batch format {version!r} is not {BATCH_FORMAT!r}; "
            "it was not written by a compatible gateway"
        )
    kind = metadata.get("kind", "train")
    if kind not in WORK_KINDS:
        raise ValidationError(f"{source}: batch kind {kind!r} is not one of {list(WORK_KINDS)}")
    records = _parse_records(metadata.get("records"), source)
    if kind == "evaluate" and tensors:
        raise ValidationError(f"{source}: an evaluation batch carries tensors")
    per_device: list[TensorDict] = [{} for _ in records]
    for full_name, array in tensors.items():
        index, sep, name = full_name.partition("/")
        if not sep or not name or not index.isdigit() or int(index) >= len(records):
            raise ValidationError(
                f"{source}: tensor {full_name!r} does not name one of the "
                f"{len(records)} device records as '<index>/<name>'"
            )
        per_device[int(index)][name] = array
    updates = []
    for i, (rec, dev_tensors) in enumerate(zip(records, per_device, strict=True)):
        if not dev_tensors and kind == "train":
            raise ValidationError(f"{source}: record {i} ({rec['device_id']}) has no tensors")
        updates.append(_update_from_record(rec, dev_tensors, source, i))
    return updates


def _parse_records(raw: str | None, source: str) -> list[dict[str, Any]]:
    if raw is None:
        raise ValidationError(f"{source}: update batch has no 'records' metadata")
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{source}: 'records' metadata is not JSON ({exc})") from exc
    if not isinstance(records, list) or not records:
        raise ValidationError(f"{source}: 'records' must be a non-empty JSON list")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValidationError(f"{source}: record {i} is not a JSON object")
        missing = {"device_id", "task_id", "model_version", "num_samples"} - rec.keys()
        if missing:
            raise ValidationError(f"{source}: record {i} lacks {sorted(missing)}")
    return records


def _update_from_record(
    rec: dict[str, Any], tensors: TensorDict, source: str, index: int
) -> DeviceUpdate:
    num_samples = rec["num_samples"]
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 0:
        raise ValidationError(f"{source}: record {index} num_samples {num_samples!r} is invalid")
    metrics = rec.get("metrics") or {}
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise ValidationError(f"{source}: record {index} metrics is not an object of numbers")
    received = rec.get("received_at")
    try:
        received_at = datetime.fromisoformat(received) if received else None
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{source}: record {index} received_at {received!r}") from exc
    return DeviceUpdate(
        device_id=str(rec["device_id"]),
        task_id=str(rec["task_id"]),
        model_version=str(rec["model_version"]),
        num_samples=num_samples,
        tensors=tensors,
        metrics={str(k): float(v) for k, v in metrics.items()},
        received_at=received_at,
        gateway_id=str(rec.get("gateway_id", "")),
    )
