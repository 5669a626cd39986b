"""Committing a round: its report, then the run's commit pointer, last; reading them back."""

from __future__ import annotations

import asyncio
import time

from prefect import task
from prefect.cache_policies import NONE

from infra.run_state import CommitRecord, RoundReport, read_reports, write_commit, write_report
from infra.store import ObjectRef
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.deferred import settle
from tasks.reporting import build_round_report, next_commit
from tasks.results import RoundResults


@task(name="commit-round", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def commit_round(
    ctx: RunContext,
    commit: CommitRecord,
    results: RoundResults,
    late: int,
    started_at: float | None = None,
    trained: ObjectRef | None = None,
) -> tuple[CommitRecord, RoundReport]:
    """Write the round's report, then move ``commit.json`` (one atomic PUT).

    ``commit`` is the previous round's commit as written; the round trained the
    model it points at (``trained``, checked), whether it opened before that commit
    or after. ``started_at`` is when the round could start (it had its model), for the
    report's ``duration_s``.
    """
    if results.opened.round != commit.next_round:
        raise ValueError(
            f"refusing to commit round {results.opened.round}: the run's next round is "
            f"{commit.next_round} (was this round already applied?)"
        )
    if trained is not None and trained != commit.global_model:
        raise ValueError(
            f"refusing to commit round {results.opened.round}: it trained "
            f"{trained.key} ({trained.sha256[:12]}), but the commit before it points at "
            f"{commit.global_model.key} ({commit.global_model.sha256[:12]})"
        )
    report = build_round_report(
        results,
        commit=commit,
        late=late,
        min_reports=ctx.params.min_reports,
        flow_run_id=current_flow_run_id(),
        round_started_at=started_at,
        now=time.time(),
    )
    store = store_for(ctx.s3)

    def write() -> CommitRecord:
        settle(results.opened.round)  # the round's deferred lineage records are in S3
        ref = write_report(store, ctx.job, ctx.run_id, report)
        new = next_commit(commit, report, results.root, ref)
        write_commit(store, new)
        return new

    return await asyncio.to_thread(write), report


@task(name="load-reports", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def load_reports(ctx: RunContext, commit: CommitRecord) -> list[RoundReport]:
    """Every committed round's report, in order, from the commit pointer."""
    return await asyncio.to_thread(read_reports, store_for(ctx.s3), commit)
