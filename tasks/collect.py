"""The leaf level's two kinds of task: the round's close, and each leaf's collection.

They share nothing in memory; they meet in S3, as gateways and the flow do.
``close_when_due`` counts uploads across the round (key names, one LIST per
poll), drives the progress artifact, and closes the round by rewriting the
job's pointer when ``ClosePolicy`` says so. Each ``collect_leaf`` streams its
leaf's batches into a ``LeafCollector`` while the round is open and, once it
reads the pointer as closed, lists one last time. Gateways acknowledge an
upload only after its batch is in S3 and a fresh read of the pointer still
says open (docs/gateway.md), so that last listing holds every acknowledged
update: no grace sleep, no timing assumption.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from prefect import task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger

from aggregation.clipping import NormBoundState
from aggregation.collector import LeafCollector
from aggregation.guards import GuardConfig
from edge.manifests import LeafTask
from edge.round_control import round_is_open, set_round_status
from infra.errors import CanopyError
from infra.keys import partial_key
from infra.outputs import Output, Provenance, put_with_lineage
from infra.store import ObjectRef, ObjectStore, get_json
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.intake import LeafIntake, count_reports
from tasks.planning import OpenedRound
from tasks.results import Closing, LeafOutcome
from tasks.ui import ProgressBar, emit_lineage_events

POLL_SECONDS = 0.25
# A leaf gives up on a round still open this long after its deadline: the close task died.
CLOSE_OVERDUE_S = 120.0


class RoundNotClosedError(CanopyError):
    """A round stayed open long past its deadline, so its leaves cannot finish."""


@task(name="close-round", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def close_when_due(ctx: RunContext, opened: OpenedRound) -> Closing:
    """Wait until the round has its reports or reaches its deadline, then close it."""
    store = store_for(ctx.s3)
    policy = opened.close_policy
    progress = await ProgressBar.start(
        f"round {opened.round}: device reports ({opened.target} needed)", total=opened.target
    )
    while True:
        seen = await asyncio.to_thread(count_reports, store, ctx.job, ctx.run_id, opened.round)
        await progress.show(seen)
        now = datetime.now(UTC)
        if (reason := policy.reason_to_close(seen, now)) is not None:
            break
        await asyncio.sleep(min(POLL_SECONDS, policy.seconds_left(now)))
    closed_at = time.time()
    await asyncio.to_thread(set_round_status, store, opened.active, "closed")
    await progress.show(seen, final=True)
    get_run_logger().info(
        "close-round: round %d closed (%s) with %d upload(s) in", opened.round, reason, seen
    )
    return Closing(reason=reason, reports_seen=seen, closed_at=closed_at)


def _load_task(store: ObjectStore, ref: ObjectRef) -> LeafTask:
    return LeafTask.model_validate(get_json(store, ref.key, expected_sha256=ref.sha256))


async def _stream_until_closed(intake: LeafIntake, store: ObjectStore) -> None:
    """Read batches while the round is open; after reading it closed, read once more."""
    t = intake.task
    give_up = t.deadline + timedelta(seconds=CLOSE_OVERDUE_S)
    while True:
        still_open = await asyncio.to_thread(round_is_open, store, t.job, t.run_id, t.round)
        if not intake.complete:
            await asyncio.to_thread(intake.read_new)
        if not still_open or intake.complete:
            return
        if datetime.now(UTC) > give_up:
            raise RoundNotClosedError(
                f"round {t.round} of {t.job}/{t.run_id} is still open {CLOSE_OVERDUE_S:.0f} s "
                f"after its deadline; leaf {t.leaf} stops (did the close-round task fail?)"
            )
        await asyncio.sleep(POLL_SECONDS)


def _store_partial(ctx: RunContext, intake: LeafIntake, started: datetime) -> ObjectRef:
    t, partial = intake.task, intake.collector.result()
    return put_with_lineage(
        intake.store,
        Output(partial_key(t.job, t.run_id, t.round, t.leaf), partial.to_bytes(), kind="partial"),
        Provenance(
            kind="partial-aggregation",
            inputs=[t.global_model, *([t.program] if t.program else []), *intake.batches],
            parameters={
                "node": t.leaf,
                "level": 0,
                "round": t.round,
                "devices": partial.count,
                "weight": partial.weight,
                "rejected": dict(intake.collector.rejected),
                "clipped": dict(intake.collector.clipped),
                "norm_bound": intake.collector.norm_bound,
                "max_num_samples": t.max_num_samples,
            },
            started_at=started,
            flow_run_id=current_flow_run_id(),
        ),
        observers=[emit_lineage_events],
    )


@task(name="collect-leaf", cache_policy=NONE, task_run_name="collect-{leaf}")
async def collect_leaf(
    ctx: RunContext, leaf: str, task_ref: ObjectRef, norm_state: NormBoundState
) -> LeafOutcome:
    """Sum this leaf's device updates until the round closes; store the partial.

    Updates are clipped to the adaptive norm bound carried in ``norm_state``
    (round 0: a warm-up on the leaf's first updates), or to ``norm_bound`` when
    the run sets one; claims above the task's ``max_num_samples`` are refused.
    """
    started = datetime.now(UTC)
    store = store_for(ctx.s3)
    leaf_task = await asyncio.to_thread(_load_task, store, task_ref)
    collector = LeafCollector(
        spec=leaf_task.specs(),
        task_id=leaf_task.task_id,
        model_version=leaf_task.model_version,
        selected=frozenset(leaf_task.selected_device_ids),
        guard=GuardConfig(max_norm=ctx.params.norm_bound, max_weight=leaf_task.max_num_samples),
        norm_state=norm_state,
    )
    intake = LeafIntake(store=store, task=leaf_task, collector=collector)
    await _stream_until_closed(intake, store)
    ref = await asyncio.to_thread(_store_partial, ctx, intake, started)
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
        clipped=dict(collector.clipped),
        norm_bound=collector.norm_bound,
        duplicates=collector.duplicates,
        batches=len(intake.batches),
        bytes_in=collector.bytes_in,
        finished_at=time.time(),
    )
