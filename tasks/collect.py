"""The leaf level's two kinds of task: the round's close, and each leaf's collection.

They share nothing in memory; they meet in S3, as gateways and the flow do.
``close_when_due`` counts uploads across the round (key names, one LIST per
poll), drives the progress artifact, and closes the round by rewriting the
job's pointer when ``ClosePolicy`` says so. Each leaf's collection
(``collect_leaf``, in ``tasks.leaf``: it also runs on edge workers, see
``flows.edge_leaf``) streams its leaf's batches until it reads the pointer as
closed, then lists one last time.

Once every leaf has finished, ``check_leaves`` runs round 0's check across
leaves (``aggregation.clipping``): a leaf whose warm-up bound was set by
outsized updates has its partial scaled down to the round's bound and stored
again (``partials/{leaf}-bounded``) before any node adds it. In every other
round, and in an honest round 0, it reads nothing and writes nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger

from aggregation.clipping import ROUND_CLIP_REASON, AdaptiveNormBound, LeafScale
from edge.round_control import set_round_status
from infra.keys import partial_key
from infra.outputs import LineageObserver, Output, Provenance, put_with_lineage
from infra.store import ObjectStore
from tasks.aggregate import load_partial
from tasks.close_signal import announce_closed
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.evaluation import count_evaluations
from tasks.intake import count_reports

# The leaf's collection lives in tasks.leaf; its names stay importable from here.
from tasks.leaf import (  # noqa: F401
    CLOSE_OVERDUE_S,
    POLL_SECONDS,
    UNREADABLE_AFTER_CLOSE_S,
    UNREADABLE_PAUSE_MAX_S,
    BatchesUnreadableError,
    RoundNotClosedError,
    collect_leaf,
)
from tasks.leaf_outcome import LeafOutcome
from tasks.planning import OpenedRound
from tasks.results import Closing, LeafLevel
from tasks.ui import ProgressBar, emit_lineage_events

# The close task counts the whole round's uploads with one LIST per poll (a leaf
# reads its own batches at POLL_SECONDS). The round closes on average half a poll
# after its last acknowledged upload, on the critical path of every round, so it
# polls every 50 ms: 20 LISTs a second while a round is open (a few ms each on
# moto, a page per thousand batch keys), for 25 ms less per round than at 0.1 s.
CLOSE_POLL_SECONDS = 0.05


@task(name="close-round", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def close_when_due(ctx: RunContext, opened: OpenedRound) -> Closing:
    """Wait until the round has its reports or reaches its deadline, then close it.

    The same for a round's federated evaluation (``opened.active.kind == "evaluate"``),
    counting its results instead of updates.
    """
    store = store_for(ctx.s3)
    policy = opened.close_policy
    evaluating = opened.active.kind == "evaluate"
    count = count_evaluations if evaluating else count_reports
    what = "device evaluations" if evaluating else "device reports"
    progress = ProgressBar(
        f"round {opened.round}: {what} ({opened.target} needed)", total=opened.target
    )
    while True:
        seen = await asyncio.to_thread(count, store, ctx.job, ctx.run_id, opened.round)
        progress.show(seen)
        now = datetime.now(UTC)
        if (reason := policy.reason_to_close(seen, now)) is not None:
            break
        await asyncio.sleep(min(CLOSE_POLL_SECONDS, policy.seconds_left(now)))
    closed_at = time.time()
    await asyncio.to_thread(set_round_status, store, opened.active, "closed")
    active = opened.active
    announce_closed(active.job, active.run_id, active.round, active.kind)
    progress.show(seen, final=True)  # in the background: the leaves need not wait for the UI
    get_run_logger().info(
        "close-round: round %d %s closed (%s) with %d upload(s) in",
        opened.round,
        "evaluation" if evaluating else "training",
        reason,
        seen,
    )
    return Closing(reason=reason, reports_seen=seen, closed_at=closed_at)


async def check_leaves(ctx: RunContext, rnd: int, level: LeafLevel) -> LeafLevel:
    """Round 0's check across leaves: bound the partial of every outsized leaf.

    Decided from the leaves' summaries alone (``AdaptiveNormBound.check_leaves``),
    once every leaf has finished and before any node adds partials, so it holds
    for any tree depth. Only an outsized leaf's partial is read, scaled and
    stored again; its outcome then points at the bounded partial and counts its
    updates under ``adaptive-norm-round``, which the round report adds up.
    """
    verdicts = AdaptiveNormBound().check_leaves({o.leaf: o.norm_summary() for o in level.leaves})
    if not verdicts:
        return level
    bounded = await asyncio.gather(
        *(
            bound_leaf(ctx, rnd, o.leaf, o, verdicts[o.leaf])
            for o in level.leaves
            if o.leaf in verdicts
        )
    )
    by_leaf = {o.leaf: o for o in bounded}
    get_run_logger().warning(
        "round %d: leaves %s were calibrated by outsized updates; scaled to the round's bound %.4g",
        rnd,
        sorted(by_leaf),
        next(iter(verdicts.values())).bound,
    )
    return level.model_copy(update={"leaves": [by_leaf.get(o.leaf, o) for o in level.leaves]})


def bounded_leaf(
    store: ObjectStore,
    job: str,
    run_id: str,
    rnd: int,
    outcome: LeafOutcome,
    verdict: LeafScale,
    *,
    observers: Sequence[LineageObserver] = (emit_lineage_events,),
) -> LeafOutcome:
    """Store ``outcome``'s partial scaled by the verdict; the outcome that points at it."""
    started = datetime.now(UTC)
    partial = load_partial(store, outcome.partial).scaled(verdict.factor)
    node = f"{outcome.leaf}-bounded"
    ref = put_with_lineage(
        store,
        Output(partial_key(job, run_id, rnd, node), partial.to_bytes(), kind="partial"),
        Provenance(
            kind="partial-aggregation",
            inputs=[outcome.partial],
            parameters={  # no "level": this is the leaf's partial, bounded, not a new node
                "node": node,
                "leaf": outcome.leaf,
                "round": rnd,
                "check": "round-zero",
                "scale": verdict.factor,
                "round_bound": verdict.bound,
                "devices": partial.count,
                "weight": partial.weight,
            },
            started_at=started,
            flow_run_id=current_flow_run_id(),
        ),
        observers=observers,
    )
    clipped = dict(outcome.clipped)
    clipped[ROUND_CLIP_REASON] = clipped.get(ROUND_CLIP_REASON, 0) + verdict.updates
    bound = verdict.bound if outcome.norm_bound is None else min(outcome.norm_bound, verdict.bound)
    return outcome.model_copy(
        update={"partial": ref, "clipped": clipped, "norm_bound": bound, "finished_at": time.time()}
    )


@task(name="bound-leaf", cache_policy=NONE, task_run_name="bound-{leaf}")
async def bound_leaf(
    ctx: RunContext, rnd: int, leaf: str, outcome: LeafOutcome, verdict: LeafScale
) -> LeafOutcome:
    """Scale an outsized leaf's partial to round 0's bound (``check_leaves``)."""
    return await asyncio.to_thread(
        bounded_leaf, store_for(ctx.s3), ctx.job, ctx.run_id, rnd, outcome, verdict
    )
