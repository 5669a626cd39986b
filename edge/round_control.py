"""Opening, closing and reading a round's control objects: the one way to do it.

The round flow and the test/benchmark harness both open rounds through
``open_round``: each leaf's ``LeafTask`` first, then the job's ``ActiveRound``
pointer, last, so a gateway never follows a pointer to a manifest that does not
exist yet. Closing rewrites the pointer; ``round_is_open`` reads it uncached,
which is what the close fence relies on (see docs/gateway.md): an upload a
gateway acknowledged was in S3 before the pointer said ``closed``, so a reader
that sees ``closed`` and then lists the round's updates finds every one of them.
The builders are pure; only ``open_round``, ``set_round_status`` and
``read_active`` touch the store. A round's federated evaluation is opened the
same way, with ``kind="evaluate"`` tasks and pointer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from edge.manifests import (
    KIND_ACTIVE_ROUND,
    KIND_LEAF_TASK,
    ActiveRound,
    DataHint,
    LeafTask,
    RoundStatus,
    Runtime,
    WorkKind,
    make_task_id,
)
from infra.errors import ObjectNotFoundError
from infra.keys import active_job_key, evaluation_task_key, task_manifest_key
from infra.store import ObjectRef, ObjectStore, get_json, put_json

# Leaf tasks written at once when a round opens (each one PUT; the pointer follows).
TASK_WRITERS = 8


def leaf_tasks(
    *,
    job: str,
    run_id: str,
    rnd: int,
    selected_by_leaf: Mapping[str, Sequence[str]],
    global_model: ObjectRef,
    program: ObjectRef | None,
    tensor_spec: Mapping[str, tuple[list[int], str]],
    hyperparams: Mapping[str, Any],
    runtime: Runtime,
    deadline: datetime,
    data_hint: DataHint | None = None,
    max_num_samples: int | None = None,
    kind: WorkKind = "train",
    metrics: Sequence[str] = (),
) -> dict[str, LeafTask]:
    """Pure: one ``LeafTask`` per leaf (every leaf, even one nobody was routed to)."""
    extra: dict[str, Any] = {}
    if max_num_samples is not None:
        extra["max_num_samples"] = max_num_samples
    if kind != "train":
        extra["kind"] = kind
    if metrics:
        extra["metrics"] = list(metrics)
    return {
        leaf: LeafTask(
            task_id=make_task_id(job, run_id, rnd, leaf, kind),
            job=job,
            run_id=run_id,
            round=rnd,
            leaf=leaf,
            selected_device_ids=list(devices),
            model_version=global_model.sha256,
            global_model=global_model,
            program=program,
            tensor_spec=dict(tensor_spec),
            hyperparams=dict(hyperparams),
            runtime=runtime,
            deadline=deadline,
            data_hint=data_hint,
            **extra,
        )
        for leaf, devices in selected_by_leaf.items()
    }


def active_round(
    *,
    job: str,
    run_id: str,
    rnd: int,
    leaves: Sequence[str],
    status: RoundStatus,
    opened_at: datetime,
    closed_at: datetime | None = None,
    poll_seconds: float = 2.0,
    idle_poll_seconds: float = 10.0,
    kind: WorkKind = "train",
) -> ActiveRound:
    """Pure: the job's pointer to this round, with the key of every leaf's manifest."""
    manifest_key = task_manifest_key if kind == "train" else evaluation_task_key
    return ActiveRound(
        job=job,
        run_id=run_id,
        round=rnd,
        status=status,
        kind=kind,
        leaves=list(leaves),
        leaf_manifest_keys={leaf: manifest_key(job, run_id, rnd, leaf) for leaf in leaves},
        opened_at=opened_at,
        closed_at=closed_at,
        poll_seconds=poll_seconds,
        idle_poll_seconds=idle_poll_seconds,
    )


def open_round(
    store: ObjectStore, tasks: Mapping[str, LeafTask], active: ActiveRound
) -> dict[str, ObjectRef]:
    """Write every leaf's task, then the pointer (last); return the tasks' references."""
    if active.status != "open":
        raise ValueError(f"open_round needs an open pointer, got status {active.status!r}")
    missing = sorted(set(active.leaves) - set(tasks))
    if missing:
        raise ValueError(f"round {active.round}: no task for leaves {missing}")
    mixed = sorted(leaf for leaf, task in tasks.items() if task.kind != active.kind)
    if mixed:
        raise ValueError(f"round {active.round}: tasks of leaves {mixed} are not {active.kind}")

    def write(leaf: str) -> ObjectRef:
        return put_json(store, active.leaf_manifest_keys[leaf], tasks[leaf], kind=KIND_LEAF_TASK)

    # the tasks side by side (they are independent), the pointer only after all of them
    with ThreadPoolExecutor(max_workers=min(TASK_WRITERS, max(1, len(tasks)))) as pool:
        refs = dict(zip(tasks, pool.map(write, tasks), strict=True))
    put_json(store, active_job_key(active.job), active, kind=KIND_ACTIVE_ROUND)
    return refs


def set_round_status(
    store: ObjectStore, active: ActiveRound, status: RoundStatus, *, at: datetime | None = None
) -> ActiveRound:
    """Rewrite the job's pointer with ``status`` (closing the round or finishing the job)."""
    closed_at = None if status == "open" else (at or datetime.now(UTC))
    record = active.model_copy(update={"status": status, "closed_at": closed_at})
    put_json(store, active_job_key(active.job), record, kind=KIND_ACTIVE_ROUND)
    return record


def read_active(store: ObjectStore, job: str) -> ActiveRound | None:
    """The job's pointer as S3 has it now (no cache), or None before the first round."""
    try:
        return ActiveRound.model_validate(get_json(store, active_job_key(job)))
    except ObjectNotFoundError:
        return None


def round_is_open(
    store: ObjectStore, job: str, run_id: str, rnd: int, kind: WorkKind = "train"
) -> bool:
    """Whether the gateways may still acknowledge uploads (``kind`` ones) for this run's round."""
    active = read_active(store, job)
    return (
        active is not None
        and active.status == "open"
        and active.run_id == run_id
        and active.round == rnd
        and active.kind == kind
    )
