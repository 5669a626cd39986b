"""Tasks that open a round at the gateways and end the job, through S3 control objects only.

Gateways are stateless: opening a round means writing each leaf's ``LeafTask``
and then the job's ``ActiveRound`` pointer (``edge.round_control.open_round``);
the plan itself is the pure ``tasks.planning.plan_round``. ``open_planned`` is
the one way a task opens a round (training here, evaluation in
``tasks.evaluation``). Closing is the close task's job (``tasks.collect``);
``mark_done`` tells devices the job is over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger

from aggregation.clipping import NormBoundState
from aggregation.tensors import decode_tensors, spec_of
from edge import round_control
from edge.data.partition import partition_indices
from infra.keys import registry_prefix
from infra.run_state import CommitRecord
from infra.store import ObjectRef, ObjectStore
from tasks.context import RunContext, store_for
from tasks.models import run_dataset
from tasks.planning import OpenedRound, RoundPlan, plan_round
from tasks.results import ProgramExport
from tasks.run_cache import current_cache


def registered_devices(store: ObjectStore, job: str) -> list[str]:
    """Device ids enrolled for ``job`` (from the registry keys; no per-device GET)."""
    prefix = registry_prefix(job)
    return [key[len(prefix) : -len(".json")] for key in store.list_keys(prefix)]


def tensor_spec(store: ObjectStore, model: ObjectRef) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) of a stored model: what every update must match."""
    state, _ = decode_tensors(
        store.get(model.key, expected_sha256=model.sha256).data, source=model.uri
    )
    return {name: (list(s.shape), s.dtype) for name, s in spec_of(state).items()}


def device_weight_cap(ctx: RunContext, store: ObjectStore) -> int:
    """The largest weight (examples) a device may claim in this run.

    ``max_device_samples`` when the run sets it (a real fleet); otherwise the
    largest partition the simulated devices hold, so one phone claiming a
    billion samples is refused at the gateway instead of deciding the model.
    """
    if ctx.params.max_device_samples is not None:
        return ctx.params.max_device_samples
    job = ctx.job_spec()
    scheme = ctx.params.partition or job.partition
    key = f"{scheme.model_dump_json()}|{ctx.params.num_devices}|{ctx.params.seed}"

    def largest() -> int:
        data = run_dataset(ctx, store)
        parts = partition_indices(
            data.y_train, scheme, ctx.params.num_devices, ctx.params.seed, owners=data.train_owners
        )
        return max(int(p.shape[0]) for p in parts)

    return current_cache().weight_cap(key, largest)


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


@dataclass(frozen=True)
class PlanBasis:
    """What any plan reads from S3 and the clock: the model's tensors, the weight cap, now."""

    store: ObjectStore
    tensor_spec: dict[str, tuple[list[int], str]]
    now: datetime
    max_num_samples: int


def open_planned(
    ctx: RunContext, model: ObjectRef, plan: Callable[[PlanBasis], RoundPlan]
) -> OpenedRound:
    """The one way a task opens a round: plan it, write every leaf's task, then the pointer.

    ``plan`` is the kind-specific part (``plan_round`` or ``plan_evaluation``
    with its own arguments); the writing is ``edge.round_control.open_round``.
    """
    started = time.time()
    store = store_for(ctx.s3)
    planned = plan(
        PlanBasis(
            store=store,
            tensor_spec=tensor_spec(store, model),
            now=datetime.now(UTC),
            max_num_samples=device_weight_cap(ctx, store),
        )
    )
    refs = round_control.open_round(store, planned.tasks, planned.active)
    return OpenedRound(
        **planned.shared(), task_refs=refs, started_at=started, finished_at=time.time()
    )


@task(name="open-round", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def open_round(
    ctx: RunContext,
    rnd: int,
    devices: list[str],
    leaves: Sequence[str],
    commit: CommitRecord,
    program: ProgramExport | None,
) -> OpenedRound:
    """Plan the round, write every leaf's task, then point the gateways at it."""
    norm_state = NormBoundState.model_validate(commit.norm_bound or {})

    def plan(basis: PlanBasis) -> RoundPlan:
        return plan_round(
            ctx.params,
            ctx.job_spec(),
            rnd=rnd,
            devices=devices,
            leaves=leaves,
            global_model=commit.global_model,
            program=program.ref if program is not None else None,
            tensor_spec=basis.tensor_spec,
            now=basis.now,
            max_num_samples=basis.max_num_samples,
            norm_state=norm_state,
        )

    opened = await asyncio.to_thread(open_planned, ctx, commit.global_model, plan)
    get_run_logger().info(
        "open-round: round %d asks %d device(s) on %d leaves, closes at %d reports or %s",
        rnd,
        opened.selected,
        len(leaves),
        opened.target,
        opened.deadline.isoformat(timespec="seconds"),
    )
    return opened


@task(name="mark-done", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def mark_done(ctx: RunContext, leaves: Sequence[str], commit: CommitRecord) -> None:
    """Tell gateways the job is finished, so devices stop asking for its work."""
    now = datetime.now(UTC)
    pointer = round_control.active_round(
        job=ctx.job,
        run_id=ctx.run_id,
        rnd=max(commit.next_round - 1, 0),
        leaves=leaves,
        status="done",
        opened_at=now,
        closed_at=now,
    )
    await asyncio.to_thread(round_control.set_round_status, store_for(ctx.s3), pointer, "done")
