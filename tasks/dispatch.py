"""Tasks that open a round at the gateways and end the job, through S3 control objects only.

Gateways are stateless: opening a round means writing each leaf's ``LeafTask``
and then the job's ``ActiveRound`` pointer (``edge.round_control.open_round``);
the plan itself is the pure ``tasks.planning.plan_round``. ``open_planned`` is
the one way a task opens a round (training here, evaluation in
``tasks.evaluation``). Closing is the close task's job (``tasks.collect``);
``mark_done`` tells devices the job is over. The registry is read through its
index (``read_registry``): a round reads the shards gateways added since the
last one, and hands ``open-round`` a reference to the ids, not the ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import pydantic
from prefect import task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict

from aggregation.clipping import NormBoundState
from aggregation.tensors import decode_tensors, spec_of
from edge import round_control
from edge.data.partition import partition_indices
from edge.registry_index import IndexShard, RegistryIndex, record_ids
from infra.errors import CanopyError
from infra.keys import registry_index_prefix, registry_prefix
from infra.run_state import CommitRecord
from infra.store import ObjectRef, ObjectStore, get_json
from tasks.context import RunContext, store_for
from tasks.gateways import wake_soon
from tasks.models import run_dataset
from tasks.planning import OpenedRound, RoundPlan, plan_round
from tasks.results import ProgramExport
from tasks.run_cache import current_cache

log = logging.getLogger("canopy.registry")

# New index shards are read this many at a time (a run's first read takes them all).
SHARD_READERS = 8


class RegistryView(BaseModel):
    """What ``wait-for-devices`` hands ``open-round``: a reference to the ids, not the ids.

    Prefect records a task's parameters and results; ten thousand ids would travel
    through the API twice a round. The ids stay in the run cache under ``digest``.
    """

    model_config = ConfigDict(frozen=True)

    job: str
    devices: int
    source: Literal["index", "records"]
    shards: int
    new_shards: int
    digest: str


@dataclass(frozen=True)
class RegistryRead:
    """One read of a job's registry: the ids, where they came from, what it cost."""

    ids: list[str]
    source: Literal["index", "records"]
    shards: int  # shards listed (index) or record keys listed (records)
    new_shards: int  # shards read (GET) by this read

    def view(self, job: str) -> RegistryView:
        digest = hashlib.sha256("\n".join(self.ids).encode()).hexdigest()
        return RegistryView(
            job=job,
            devices=len(self.ids),
            source=self.source,
            shards=self.shards,
            new_shards=self.new_shards,
            digest=digest,
        )


def read_registry(store: ObjectStore, job: str, index: RegistryIndex) -> RegistryRead:
    """The ids enrolled for ``job``: from the index's shards when it has any.

    One LIST of the index prefix (a page per thousand shards) and one GET per
    shard ``index`` has not read yet, so a round costs O(new shards), never a
    listing of every device record. A registry without a single shard was
    written by gateways older than the index: its records are listed instead
    (keys only), as before the index. An unreadable shard is skipped and tried
    again at the next read.
    """
    keys = store.list_keys(registry_index_prefix(job))
    if not keys and not index.shards:
        prefix = registry_prefix(job)
        ids = record_ids(prefix, store.list_keys(prefix))
        return RegistryRead(ids=sorted(ids), source="records", shards=len(ids), new_shards=0)
    new = index.unseen(keys)

    def fetch(key: str) -> tuple[str, IndexShard | None]:
        try:
            return key, IndexShard.model_validate(get_json(store, key))
        except (CanopyError, pydantic.ValidationError) as exc:
            log.warning("registry index shard %s is unreadable, skipped for now: %s", key, exc)
            return key, None

    if new:
        with ThreadPoolExecutor(min(SHARD_READERS, len(new))) as pool:
            for key, shard in pool.map(fetch, new):
                if shard is not None:
                    index.add(key, shard)
    return RegistryRead(
        ids=index.sorted_ids(), source="index", shards=len(keys), new_shards=len(new)
    )


def run_registry(store: ObjectStore, job: str) -> RegistryRead:
    """``read_registry`` with the run's index (kept in the run cache between rounds)."""
    index = current_cache().registry(job, lambda: RegistryIndex(job))
    return read_registry(store, job, index)


def registered_devices(store: ObjectStore, job: str) -> list[str]:
    """Device ids enrolled for ``job`` (index shards, or record keys; never a GET per device)."""
    return run_registry(store, job).ids


def devices_of(store: ObjectStore, view: RegistryView | Sequence[str]) -> list[str]:
    """The ids a ``RegistryView`` refers to: from the run cache, else read again.

    A plain list of ids (older callers) is taken as it is.
    """
    if not isinstance(view, RegistryView):
        return list(view)
    kept = current_cache().snapshots.get(view.digest)
    return kept if kept is not None else run_registry(store, view.job).ids


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
async def wait_for_devices(ctx: RunContext) -> RegistryView:
    """Wait (up to ``registry_wait_s``) until enough devices have enrolled for the job.

    Returns a reference to the ids (kept in the run cache), not the ids.
    """
    store = store_for(ctx.s3)
    wanted = ctx.params.selected_per_round
    deadline = time.monotonic() + ctx.params.registry_wait_s
    while True:
        read = await asyncio.to_thread(run_registry, store, ctx.job)
        if len(read.ids) >= wanted or time.monotonic() >= deadline:
            break
        await asyncio.sleep(1.0)
    view = read.view(ctx.job)
    current_cache().keep_snapshot(view.digest, read.ids)
    get_run_logger().info(
        "wait-for-devices: %d device(s) enrolled for %s (want %d), from the %s "
        "(%d listed, %d shard(s) read now)",
        view.devices,
        ctx.job,
        wanted,
        view.source,
        view.shards,
        view.new_shards,
    )
    return view


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
    devices: RegistryView | list[str],
    leaves: Sequence[str],
    commit: CommitRecord,
    program: ProgramExport | None,
) -> OpenedRound:
    """Plan the round, write every leaf's task, then point the gateways at it."""
    ids = devices_of(store_for(ctx.s3), devices)
    norm_state = NormBoundState.model_validate(commit.norm_bound or {})

    def plan(basis: PlanBasis) -> RoundPlan:
        return plan_round(
            ctx.params,
            ctx.job_spec(),
            rnd=rnd,
            devices=ids,
            leaves=leaves,
            global_model=commit.global_model,
            program=program.ref if program is not None else None,
            tensor_spec=basis.tensor_spec,
            now=basis.now,
            max_num_samples=basis.max_num_samples,
            norm_state=norm_state,
        )

    opened = await asyncio.to_thread(open_planned, ctx, commit.global_model, plan)
    wake_soon(ctx.gateway, ctx.job)  # held long polls hear of it now, not a watch period later
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
