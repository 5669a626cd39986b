"""Tasks that open and close a round at the gateways, through S3 manifests only.

Gateways are stateless: opening a round means writing each leaf's ``LeafTask``
and then the job's ``ActiveRound`` pointer (last, so a gateway never sees a
pointer to a manifest that does not exist yet); closing it means rewriting the
pointer with ``status="closed"``, after which uploads are refused as late.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from prefect import task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict

from aggregation.cohort import group_by_leaf, pace_seconds, reports_needed, select_cohort
from aggregation.tensors import decode_tensors, spec_of
from edge.jobs import get_job
from edge.manifests import (
    KIND_ACTIVE_ROUND,
    KIND_LEAF_TASK,
    ActiveRound,
    DataHint,
    LeafTask,
    RoundStatus,
    make_task_id,
    registry_prefix,
)
from edge.routing import leaf_for_device
from tasks.params import local_hyperparams
from infra.keys import active_job_key, task_manifest_key
from infra.run_state import CommitRecord
from infra.store import ObjectRef, ObjectStore, put_json
from tasks.context import RunContext, store_for

# Polls per second the whole fleet may send the gateways while waiting for work.
FLEET_POLLS_PER_SECOND = 200.0


class RoundPlan(BaseModel):
    """Who was asked to train in a round, where their tasks are, when it ends."""

    model_config = ConfigDict(frozen=True)

    round: int
    leaves: list[str]
    tasks: dict[str, LeafTask]
    task_refs: dict[str, ObjectRef]
    selected: int
    registered: int
    target: int
    deadline: datetime
    opened_at: datetime


def registered_devices(store: ObjectStore, job: str) -> list[str]:
    """Device ids enrolled for ``job`` (from the registry keys; no per-device GET)."""
    prefix = registry_prefix(job)
    return [key[len(prefix) : -len(".json")] for key in store.list_keys(prefix)]


@task(name="wait-for-devices", cache_policy=NONE, retries=2, retry_delay_seconds=[2, 5])
async def wait_for_devices(ctx: RunContext) -> list[str]:
    """Wait (up to ``registry_wait_s``) until enough devices have enrolled for the job."""
    store = store_for(ctx.s3)
    wanted = ctx.params.selected_per_round
    deadline = time.monotonic() + ctx.params.registry_wait_s
    while True:
        devices = await asyncio.to_thread(registered_devices, store, ctx.job)
        if len(devices) >= wanted or time.monotonic() >= deadline:
            break
        await asyncio.sleep(1.0)
    get_run_logger().info(
        "wait-for-devices: %d device(s) enrolled for %s (want %d)", len(devices), ctx.job, wanted
    )
    return devices


def plan_round(
    ctx: RunContext,
    *,
    rnd: int,
    devices: list[str],
    leaves: list[str],
    global_model: ObjectRef,
    program: ObjectRef | None,
    tensor_spec: dict[str, tuple[list[int], str]],
    now: datetime,
) -> RoundPlan:
    """Pure: sample the cohort, place it on leaves and write each leaf's task."""
    p = ctx.params
    job = get_job(p.job)
    selected = select_cohort(
        devices, cohort_size=p.cohort_size, over_selection=p.over_selection, seed=p.seed, rnd=rnd
    )
    by_leaf = group_by_leaf(selected, leaves, leaf_for_device)
    deadline = now + timedelta(seconds=p.round_deadline_s)
    part = p.partition or job.partition
    hint = DataHint(
        scheme=part.kind,
        num_devices=p.num_devices,
        seed=p.seed,
        alpha=part.alpha,
        shards=part.labels_per_device,
        min_size=part.min_size,
        dataset=(p.dataset or job.default_dataset).model_dump(mode="json"),
    )
    hyper = {
        **local_hyperparams(p, job).model_dump(),
        "seed": p.seed * 100_003 + rnd,
    }
    tasks = {
        leaf: LeafTask(
            task_id=make_task_id(p.job, p.run_id, rnd, leaf),
            job=p.job,
            run_id=p.run_id,
            round=rnd,
            leaf=leaf,
            selected_device_ids=by_leaf[leaf],
            model_version=global_model.sha256,
            global_model=global_model,
            program=program,
            tensor_spec=tensor_spec,
            hyperparams=hyper,
            runtime=p.runtime,
            deadline=deadline,
            data_hint=hint,
        )
        for leaf in leaves
    }
    return RoundPlan(
        round=rnd,
        leaves=leaves,
        tasks=tasks,
        task_refs={},
        selected=len(selected),
        registered=len(devices),
        target=reports_needed(cohort_size=p.cohort_size, selected=len(selected)),
        deadline=deadline,
        opened_at=now,
    )


def _active(ctx: RunContext, plan: RoundPlan, status: RoundStatus) -> ActiveRound:
    now = datetime.now(UTC)
    return ActiveRound(
        job=ctx.job,
        run_id=ctx.run_id,
        round=plan.round,
        status=status,
        leaves=plan.leaves,
        leaf_manifest_keys={
            leaf: task_manifest_key(ctx.job, ctx.run_id, plan.round, leaf) for leaf in plan.leaves
        },
        opened_at=plan.opened_at,
        closed_at=None if status == "open" else now,
        # Between rounds everyone polls; while a round runs only the unselected do.
        poll_seconds=pace_seconds(plan.registered, polls_per_second=FLEET_POLLS_PER_SECOND),
        idle_poll_seconds=pace_seconds(
            plan.registered, polls_per_second=FLEET_POLLS_PER_SECOND / 2
        ),
    )


@task(name="open-round", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def open_round(
    ctx: RunContext,
    rnd: int,
    devices: list[str],
    leaves: list[str],
    global_model: ObjectRef,
    program: ObjectRef | None,
) -> RoundPlan:
    """Write every leaf's task, then point the gateways at the round."""
    store = store_for(ctx.s3)
    state, _ = decode_tensors(
        (
            await asyncio.to_thread(
                store.get, global_model.key, expected_sha256=global_model.sha256
            )
        ).data,
        source=global_model.uri,
    )
    spec = {name: (list(s.shape), s.dtype) for name, s in spec_of(state).items()}
    plan = plan_round(
        ctx,
        rnd=rnd,
        devices=devices,
        leaves=leaves,
        global_model=global_model,
        program=program,
        tensor_spec=spec,
        now=datetime.now(UTC),
    )

    def write() -> RoundPlan:
        refs = {
            leaf: put_json(
                store, task_manifest_key(ctx.job, ctx.run_id, rnd, leaf), t, kind=KIND_LEAF_TASK
            )
            for leaf, t in plan.tasks.items()
        }
        put_json(store, active_job_key(ctx.job), _active(ctx, plan, "open"), kind=KIND_ACTIVE_ROUND)
        return plan.model_copy(update={"task_refs": refs})

    plan = await asyncio.to_thread(write)
    get_run_logger().info(
        "open-round: round %d asks %d device(s) on %d leaves, closes at %d reports or %s",
        rnd,
        plan.selected,
        len(leaves),
        plan.target,
        plan.deadline.isoformat(timespec="seconds"),
    )
    return plan


@task(name="close-round", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def close_round(ctx: RunContext, plan: RoundPlan, status: RoundStatus = "closed") -> None:
    """Tell gateways to stop accepting uploads for this round (``done`` ends the job)."""
    store = store_for(ctx.s3)
    await asyncio.to_thread(
        put_json, store, active_job_key(ctx.job), _active(ctx, plan, status), kind=KIND_ACTIVE_ROUND
    )


@task(name="mark-done", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def mark_done(ctx: RunContext, leaves: list[str], commit: CommitRecord) -> None:
    """Tell gateways the job is finished, so devices stop asking for its work."""
    now = datetime.now(UTC)
    last = max(commit.next_round - 1, 0)
    pointer = ActiveRound(
        job=ctx.job,
        run_id=ctx.run_id,
        round=last,
        status="done",
        leaves=leaves,
        leaf_manifest_keys={
            leaf: task_manifest_key(ctx.job, ctx.run_id, last, leaf) for leaf in leaves
        },
        opened_at=now,
        closed_at=now,
    )
    await asyncio.to_thread(
        put_json, store_for(ctx.s3), active_job_key(ctx.job), pointer, kind=KIND_ACTIVE_ROUND
    )
