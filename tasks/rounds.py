"""Committing a round: its report, then the run's commit pointer, last."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NONE

from infra.run_state import CommitRecord, RoundReport, write_commit, write_report
from infra.store import ObjectRef
from tasks.aggregate import RootResult
from tasks.context import RunContext, store_for


def next_commit(
    commit: CommitRecord, report: RoundReport, root: RootResult, report_ref: ObjectRef
) -> CommitRecord:
    """Pure: the pointer after a round. An abandoned round keeps the model and state."""
    return commit.model_copy(
        update={
            "next_round": report.round + 1,
            "global_model": root.global_model or commit.global_model,
            "server_state": root.server_state or commit.server_state,
            "reports": [*commit.reports, report_ref],
            "updated_at": datetime.now(UTC),
        }
    )


@task(name="commit-round", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def commit_round(
    ctx: RunContext, commit: CommitRecord, report: RoundReport, root: RootResult
) -> CommitRecord:
    """Write the round's report, then move ``commit.json`` (one atomic PUT)."""
    if report.round != commit.next_round:
        raise ValueError(
            f"refusing to commit round {report.round}: the run's next round is "
            f"{commit.next_round} (was this round already applied?)"
        )
    store = store_for(ctx.s3)

    def write() -> CommitRecord:
        ref = write_report(store, ctx.job, ctx.run_id, report)
        new = next_commit(commit, report, root, ref)
        write_commit(store, new)
        return new

    return await asyncio.to_thread(write)
