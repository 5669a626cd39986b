"""The leaf level: read group-committed device updates from S3 and sum them.

Each leaf task streams its round's update batches as gateways write them,
checks and sums each update at once (``aggregation.collector``), and reports
its count to a shared ``ReportTracker``. When the round has enough reports or
its deadline passes, the level closes the round at the gateways, waits out the
grace period in which already-accepted uploads may still land, and each leaf
reads what is left: every update a gateway acknowledged is aggregated.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict

from aggregation.collector import ACCEPTED, LeafCollector
from aggregation.guards import GuardConfig
from edge.manifests import LeafTask
from edge.update_batch import decode_update_batch
from infra.errors import CanopyError
from infra.keys import partial_key, updates_prefix
from infra.lineage import make_record
from infra.store import ObjectRef, ObjectStore
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.ui import record_lineage

POLL_SECONDS = 0.25


@dataclass
class ReportTracker:
    """Reports across all leaves of a round, shared by the leaf tasks of one level.

    The leaf tasks run concurrently in one event loop (``asyncio.gather``), so
    plain attributes and ``asyncio.Event`` are enough; no locks.
    """

    target: int
    deadline: datetime
    per_leaf: Counter[str] = field(default_factory=Counter)
    enough: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    enough_at: float | None = None  # perf_counter() when the round stopped waiting

    @property
    def reported(self) -> int:
        return sum(self.per_leaf.values())

    def __post_init__(self) -> None:
        if self.target <= 0:  # nobody was asked: nothing to wait for
            self.enough.set()

    def add(self, leaf: str, n: int) -> None:
        self.per_leaf[leaf] += n
        if self.reported >= self.target:
            self.enough.set()

    def seconds_left(self) -> float:
        return (self.deadline - datetime.now(UTC)).total_seconds()


class LeafOutcome(BaseModel):
    """What one leaf contributed: its partial in S3 and the intake counts."""

    model_config = ConfigDict(frozen=True)

    leaf: str
    partial: ObjectRef
    reported: int
    rejected: dict[str, int]
    rejection_examples: dict[str, str]
    duplicates: int
    batches: int
    bytes_in: int


def _read_new_batches(
    store: ObjectStore, prefix: str, seen: set[str], collector: LeafCollector, leaf: str
) -> tuple[int, list[ObjectRef]]:
    """Read batches not seen before; return (updates accepted, batch refs read)."""
    accepted = 0
    refs = []
    for key in store.list_keys(prefix):
        if key in seen:
            continue
        seen.add(key)
        try:
            obj = store.get(key)
            updates = decode_update_batch(obj.data, source=obj.ref.uri)
        except CanopyError as exc:
            # One corrupted batch must not sink the round: count it and move on.
            collector.rejected["corrupt-batch"] += 1
            collector.rejection_examples.setdefault("corrupt-batch", str(exc))
            continue
        refs.append(obj.ref)
        collector.bytes_in += obj.ref.size
        for u in updates:
            outcome = collector.offer(
                device_id=u.device_id,
                task_id=u.task_id,
                model_version=u.model_version,
                num_samples=u.num_samples,
                tensors=u.tensors,
                metrics=u.metrics,
            )
            accepted += outcome == ACCEPTED
    return accepted, refs


@task(name="collect-leaf", cache_policy=NONE, task_run_name="collect-{leaf_task.leaf}")
async def collect_leaf(ctx: RunContext, leaf_task: LeafTask, tracker: ReportTracker) -> LeafOutcome:
    """Sum this leaf's device updates until the round closes; store the partial."""
    started = datetime.now(UTC)
    store = store_for(ctx.s3)
    leaf, rnd = leaf_task.leaf, leaf_task.round
    prefix = updates_prefix(ctx.job, ctx.run_id, rnd, leaf)
    collector = LeafCollector(
        spec=leaf_task.specs(),
        task_id=leaf_task.task_id,
        model_version=leaf_task.model_version,
        selected=frozenset(leaf_task.selected_device_ids),
        guard=GuardConfig(max_norm=ctx.params.norm_bound),
    )
    seen: set[str] = set()
    batch_refs: list[ObjectRef] = []
    mine = len(leaf_task.selected_device_ids)
    while not tracker.closed.is_set():
        if len(collector.reported) < mine:  # nothing more can come for a leaf that is complete
            n, refs = await asyncio.to_thread(
                _read_new_batches, store, prefix, seen, collector, leaf
            )
            batch_refs += refs
            if n:
                tracker.add(leaf, n)
        await asyncio.sleep(POLL_SECONDS)
    _, refs = await asyncio.to_thread(_read_new_batches, store, prefix, seen, collector, leaf)
    batch_refs += refs
    tracker.per_leaf[leaf] = len(collector.reported)

    partial = collector.result()
    key = partial_key(ctx.job, ctx.run_id, rnd, leaf)
    ref = await asyncio.to_thread(store.put_bytes, key, partial.to_bytes(), kind="partial")
    record = make_record(
        kind="partial-aggregation",
        inputs=[
            leaf_task.global_model,
            *([leaf_task.program] if leaf_task.program else []),
            *batch_refs,
        ],
        outputs=[ref],
        parameters={
            "node": leaf,
            "level": 0,
            "round": rnd,
            "devices": partial.count,
            "weight": partial.weight,
            "rejected": dict(collector.rejected),
            "norm_bound": ctx.params.norm_bound,
        },
        started_at=started,
        flow_run_id=current_flow_run_id(),
    )
    await asyncio.to_thread(record_lineage, store, record)
    if collector.rejected:
        get_run_logger().warning(
            "collect-leaf %s: refused %s; e.g. %s",
            leaf,
            dict(collector.rejected),
            "; ".join(collector.rejection_examples.values()),
        )
    return LeafOutcome(
        leaf=leaf,
        partial=ref,
        reported=len(collector.reported),
        rejected=dict(collector.rejected),
        rejection_examples=dict(collector.rejection_examples),
        duplicates=collector.duplicates,
        batches=len(batch_refs),
        bytes_in=collector.bytes_in,
    )


async def wait_until_enough(
    tracker: ReportTracker, on_progress: Callable[[int], Awaitable[None]]
) -> None:
    """Return when the round has its target reports or its deadline has passed.

    ``on_progress`` hears the report count whenever it changes (at most once a
    second), which is what drives the round's progress artifact.
    """
    last = -1
    deadline = time.monotonic() + max(0.0, tracker.seconds_left())
    while not tracker.enough.is_set() and time.monotonic() < deadline:
        if tracker.reported != last:
            last = tracker.reported
            await on_progress(tracker.reported)
        try:
            await asyncio.wait_for(
                tracker.enough.wait(), timeout=min(1.0, deadline - time.monotonic())
            )
        except TimeoutError:
            continue
    await on_progress(tracker.reported)
