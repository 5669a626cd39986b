"""One leaf's collection: stream its devices' updates into a partial until the round closes.

``collect_leaf`` streams the leaf's batches into a ``LeafCollector`` while the
round is open and, once it reads the pointer as closed, lists one last time.
Gateways acknowledge an upload only after its batch is in S3 and a fresh read
of the pointer still says open (docs/gateway.md), so that last listing holds
every acknowledged update: no grace sleep, no timing assumption.

That last listing only counts if S3 answered it and handed over every batch it
lists. A batch S3 would not hand over through all of boto3's retries (an
outage) stays unread in ``LeafIntake.unreadable`` and is read again on the
next poll, while the round is open and, after it closed, for up to
``UNREADABLE_AFTER_CLOSE_S`` more (backing off). If it is still unreadable
then, the leaf fails with ``BatchesUnreadableError``: the round is not
committed, the flow run fails loudly, and resuming the run by its id redoes the
round (``commit.json`` still points before it). Finishing the partial without
that batch would drop updates a gateway acknowledged, silently; a failed run
that a resume repairs is the better failure.

A module of its own, apart from the round's close (``tasks.collect``), because
the same task runs in two places: inside the central round flow (in-process
leaves) and in the ``edge-leaf`` flow on a worker of the ``edge`` work pool
(``flows.edge_leaf``). A worker starts a fresh process per leaf run, so this
module imports neither torch nor the job registry (tests/test_edge_leaf.py
checks it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

from prefect import task
from prefect.cache_policies import NONE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from aggregation.clipping import LeafNorms, NormBoundState
from aggregation.collector import LeafCollector
from aggregation.guards import GuardConfig
from edge.manifests import LeafTask
from edge.round_control import round_is_open
from infra.errors import CanopyError, StoreError
from infra.keys import partial_key
from infra.outputs import Output, Provenance, put_with_lineage
from infra.store import ObjectRef, ObjectStore, get_json
from tasks.close_signal import pause_unless_closed
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.deferred import deferred
from tasks.intake import LeafIntake
from tasks.leaf_outcome import LeafOutcome
from tasks.ui import emit_lineage_events, warn_refused

POLL_SECONDS = 0.25
# A leaf gives up on a round still open this long after its deadline: the close task died.
CLOSE_OVERDUE_S = 120.0
# After the close, a listed batch S3 will not hand over is read again for this long
# (pauses doubling from POLL_SECONDS up to UNREADABLE_PAUSE_MAX_S); then the leaf fails.
UNREADABLE_AFTER_CLOSE_S = 60.0
UNREADABLE_PAUSE_MAX_S = 5.0


class RoundNotClosedError(CanopyError):
    """A round stayed open long past its deadline, so its leaves cannot finish."""


class BatchesUnreadableError(CanopyError):
    """After the round closed, S3 kept refusing a leaf's listing or some of its batches.

    Raised instead of finishing the leaf without them: they may hold
    acknowledged updates. The round is not committed; resuming the run redoes it.
    """


def _load_task(store: ObjectStore, ref: ObjectRef) -> LeafTask:
    return LeafTask.model_validate(get_json(store, ref.key, expected_sha256=ref.sha256))


def run_log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run's logger inside a Prefect run; this module's outside one (unit tests)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


async def _poll(intake: LeafIntake) -> None:
    """One ``read_new``; S3 trouble is logged (the intake keeps the batches to read again)."""
    failures = intake.read_failures
    await asyncio.to_thread(intake.read_new)
    if intake.read_failures > failures:
        t = intake.task
        run_log().warning(
            "collect-leaf %s: round %d: S3 did not hand over %s; will read again: %s",
            t.leaf,
            t.round,
            "the batch listing" if intake.list_error else f"{len(intake.unreadable)} batch(es)",
            intake.list_error or "; ".join(f"{k}: {e}" for k, e in intake.unreadable.items()),
        )


async def _stream_until_closed(intake: LeafIntake, store: ObjectStore) -> None:
    """Read batches while the round is open; after reading it closed, read once more.

    A poll whose pointer read fails counts as "still open" (the deadline bounds
    it); once closed, ``_read_the_rest`` waits for every listed batch.
    """
    t = intake.task
    give_up = t.deadline + timedelta(seconds=CLOSE_OVERDUE_S)
    while True:
        try:
            still_open = await asyncio.to_thread(round_is_open, store, t.job, t.run_id, t.round)
        except StoreError as exc:
            run_log().warning(
                "collect-leaf %s: cannot read round %d's pointer (%s); polling on",
                t.leaf,
                t.round,
                exc,
            )
            still_open = True
        if not intake.complete:
            await _poll(intake)
        if intake.complete:
            return
        if not still_open:
            await _read_the_rest(intake)
            return
        if datetime.now(UTC) > give_up:
            raise RoundNotClosedError(
                f"round {t.round} of {t.job}/{t.run_id} is still open {CLOSE_OVERDUE_S:.0f} s "
                f"after its deadline; leaf {t.leaf} stops (did the close-round task fail, or "
                "is S3 unreachable?)"
            )
        await pause_unless_closed(t.job, t.run_id, t.round, "train", POLL_SECONDS)


async def _read_the_rest(intake: LeafIntake) -> None:
    """After the close: read again until every listed batch is read, or fail the leaf."""
    t = intake.task
    give_up = time.monotonic() + UNREADABLE_AFTER_CLOSE_S
    pause = POLL_SECONDS
    while not intake.settled and not intake.complete:
        if time.monotonic() > give_up:
            what = (
                f"the listing of {intake.prefix} failed: {intake.list_error}"
                if intake.list_error
                else "unreadable: "
                + "; ".join(f"{k} ({e})" for k, e in sorted(intake.unreadable.items()))
            )
            raise BatchesUnreadableError(
                f"round {t.round} of {t.job}/{t.run_id}, leaf {t.leaf}: closed, but S3 still "
                f"refuses after {UNREADABLE_AFTER_CLOSE_S:.0f} s: {what}. The round is not "
                "committed without them (they may hold acknowledged updates); resume the run "
                "by its id to redo it"
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, UNREADABLE_PAUSE_MAX_S)
        await _poll(intake)


def _store_partial(
    ctx: RunContext, intake: LeafIntake, started: datetime
) -> tuple[ObjectRef, LeafNorms]:
    t, partial = intake.task, intake.collector.result()
    ref = put_with_lineage(
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
        later=deferred(t.round),  # in a federated-training run: written beside it
    )
    return ref, intake.collector.norm_summary(partial)


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
    ref, norms = await asyncio.to_thread(_store_partial, ctx, intake, started)
    warn_refused("collect-leaf", leaf, collector.rejected, collector.rejection_examples)
    return LeafOutcome(
        leaf=leaf,
        partial=ref,
        reported=len(collector.reported),
        rejected=dict(collector.rejected),
        rejection_examples=dict(collector.rejection_examples),
        clipped=dict(collector.clipped),
        norm_bound=collector.norm_bound,
        norms=norms.norms.to_json(),
        warmup_reference=norms.reference,
        largest_norm=norms.largest,
        duplicates=collector.duplicates,
        batches=len(intake.batches),
        bytes_in=collector.bytes_in,
        finished_at=time.time(),
    )
