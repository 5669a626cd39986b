"""Lineage ledger: which inputs, code and parameters produced each object.

A ``LineageRecord`` is pure data (a pydantic model, no I/O); ``write_lineage``
stores one copy per output at ``_lineage/{output key}.json`` so the ancestry of
any object is one GET away, and ``walk_lineage`` follows input URIs back to the
initial model. The S3 ledger is the source of truth; Prefect asset events are a
view of it that the open-source server keeps for only 7 days.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infra.errors import ObjectNotFoundError, StoreError
from infra.keys import lineage_key, parse_s3_uri
from infra.store import ObjectRef, ObjectStore, get_json, put_json

LineageKind = Literal[
    "initial-model",
    "executorch-export",
    "device-update-batch",
    "partial-aggregation",
    "global-aggregation",
    "evaluation",
    "device-evaluation-batch",
    "device-evaluation",
]


class ArtifactRef(BaseModel):
    """One input or output: its URI and the sha256 of its bytes at the time."""

    model_config = ConfigDict(frozen=True)

    uri: str
    sha256: str

    @classmethod
    def of(cls, ref: ObjectRef) -> ArtifactRef:
        return cls(uri=ref.uri, sha256=ref.sha256)


class LineageRecord(BaseModel):
    """What went in, what came out, with which code and parameters, in which flow run."""

    model_config = ConfigDict(frozen=True)

    kind: LineageKind
    inputs: list[ArtifactRef] = Field(default_factory=list)
    outputs: list[ArtifactRef]
    parameters: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    code_revision: str | None = None
    flow_run_id: str | None = None
    started_at: datetime
    finished_at: datetime


@functools.cache
def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes an artifact."""
    out: dict[str, str] = {}
    for name in ("canopy", "torch", "executorch", "prefect", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@functools.cache
def code_revision() -> str | None:
    """The git commit of this checkout, or ``CANOPY_CODE_REVISION`` when deployed without git."""
    if env := os.environ.get("CANOPY_CODE_REVISION"):
        return env
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def make_record(
    *,
    kind: LineageKind,
    inputs: list[ObjectRef | ArtifactRef],
    outputs: list[ObjectRef | ArtifactRef],
    parameters: Mapping[str, Any] | None = None,
    started_at: datetime,
    finished_at: datetime | None = None,
    flow_run_id: str | None = None,
) -> LineageRecord:
    """Build a record with versions and code revision filled in."""

    def as_artifact(ref: ObjectRef | ArtifactRef) -> ArtifactRef:
        return ArtifactRef.of(ref) if isinstance(ref, ObjectRef) else ref

    return LineageRecord(
        kind=kind,
        inputs=[as_artifact(r) for r in inputs],
        outputs=[as_artifact(r) for r in outputs],
        parameters=dict(parameters or {}),
        versions=package_versions(),
        code_revision=code_revision(),
        flow_run_id=flow_run_id,
        started_at=started_at,
        finished_at=finished_at or datetime.now(UTC),
    )


def write_lineage(store: ObjectStore, record: LineageRecord) -> list[ObjectRef]:
    """Store the record beside each of its outputs (same bucket only)."""
    refs = []
    for out in record.outputs:
        bucket, key = parse_s3_uri(out.uri)
        if bucket != store.bucket:
            raise StoreError(f"lineage output {out.uri} is not in bucket {store.bucket!r}")
        refs.append(put_json(store, lineage_key(key), record, kind="lineage"))
    return refs


def read_lineage(store: ObjectStore, object_key: str) -> LineageRecord | None:
    try:
        payload = get_json(store, lineage_key(object_key))
    except ObjectNotFoundError:
        return None
    return LineageRecord.model_validate(payload)


class LineageNode(BaseModel):
    """One object in an ancestry tree, with the record that produced it (if any)."""

    uri: str
    sha256: str
    record: LineageRecord | None = None
    parents: list[LineageNode] = Field(default_factory=list)
    problem: str | None = None


def walk_lineage(store: ObjectStore, uri: str, *, max_depth: int = 64) -> LineageNode:
    """Follow input URIs back to objects with no producing record (the initial model).

    Each object's current sha256 is compared with the one its consumer recorded,
    so a model replaced after the fact shows up as a broken link, not silently.
    Objects seen twice (a leaf partial feeding one root) are expanded once.
    """
    seen: dict[str, LineageNode] = {}

    def visit(uri: str, expected_sha: str | None, depth: int) -> LineageNode:
        bucket, key = parse_s3_uri(uri)
        if uri in seen:
            return LineageNode(uri=uri, sha256=seen[uri].sha256, record=seen[uri].record)
        head = store.head(key) if bucket == store.bucket else None
        node = LineageNode(uri=uri, sha256=head.sha256 if head else (expected_sha or ""))
        seen[uri] = node
        if head is None:
            node.problem = "object missing"
            return node
        if expected_sha is not None and head.sha256 != expected_sha:
            node.problem = f"sha256 changed: recorded {expected_sha[:12]}, now {head.sha256[:12]}"
        node.record = read_lineage(store, key)
        if node.record is None or depth >= max_depth:
            return node
        node.parents = [visit(i.uri, i.sha256, depth + 1) for i in node.record.inputs]
        return node

    return visit(uri, None, 0)
