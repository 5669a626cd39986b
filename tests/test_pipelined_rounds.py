"""Pipelined rounds through the real stack: round r+1 opens as soon as round r has its model.

A real Prefect server, moto over HTTP, two gateways and the simulator process
(``local_stack``). The tests hold what pipelining promises
(docs/orchestration.md, "Pipelined rounds"): rounds overlap in Prefect's run
tree, yet each round trains the model the round before committed, commits
strictly after it, and a failure in one round's tail leaves the next round
uncommitted (Cancelled) and the run resumable from the last commit.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from prefect import task
from prefect.cache_policies import NONE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun

import flows.federated as federated
from edge.manifests import LeafTask
from infra import keys
from infra.run_state import read_commit, read_reports
from infra.store import get_json
from tests.support.stack import LocalStack, run_flow, small_run

pytestmark = pytest.mark.slow

JOB = "hello-mobile"


def params(run_id: str, **over: Any) -> dict[str, Any]:
    return small_run(
        job=JOB,
        run_id=run_id,
        rounds=3,
        tree={"depth": 2, "width": 2},
        cohort_size=4,
        min_reports=2,
        num_devices=8,
        partition={"kind": "iid"},
        **over,
    )


async def round_runs(run_id: str) -> dict[str, FlowRun]:
    """The run's round flow runs by name (children of its federated-training run)."""
    async with get_client() as client:
        runs = await client.read_flow_runs(limit=200)
        (top,) = [r for r in runs if r.parameters.get("run_id") == run_id]
        tracking = {r.parent_task_run_id: r for r in runs if r.parent_task_run_id}
        children = await client.read_task_runs(limit=200)
    return {
        run.name: run
        for tr in children
        if tr.flow_run_id == top.id and (run := tracking.get(tr.id)) is not None
    }


def test_rounds_overlap_yet_each_trains_the_model_the_round_before_committed(
    local_stack: LocalStack,
) -> None:
    # Prepare
    stack, run_id = local_stack, f"pipe-{uuid.uuid4().hex[:6]}"
    sim = stack.simulate(JOB, 8, seed=5, dropout=0.0, offline_fraction=0.0)

    # Execute
    reports = run_flow(**params(run_id))
    sim.finish(timeout=60)

    # Assert: three rounds committed, in order, each after the one before
    assert [r.outcome for r in reports] == ["committed"] * 3
    commit = read_commit(stack.store, JOB, run_id)
    assert commit is not None and commit.next_round == 3
    stored = read_reports(stack.store, commit)
    assert [r.round for r in stored] == [0, 1, 2]
    done = [r.finished_at for r in stored]
    assert done == sorted(done) and len(set(done)) == 3

    # Assert: every round's tasks name the model the round before committed
    for rnd in range(1, 3):
        task_key = keys.task_manifest_key(JOB, run_id, rnd, "leaf-0")
        leaf_task = LeafTask.model_validate(get_json(stack.store, task_key))
        assert leaf_task.global_model == stored[rnd - 1].global_model
        assert leaf_task.model_version == stored[rnd - 1].global_model.sha256

    # Assert: the rounds' flow runs overlapped in Prefect (the next one was created,
    # and waited for its model, while the one before was still running)
    runs = asyncio.run(round_runs(run_id))
    assert sorted(runs) == ["round-0000", "round-0001", "round-0002"]
    for before, after in (("round-0000", "round-0001"), ("round-0001", "round-0002")):
        ended = runs[before].end_time
        assert ended is not None and runs[after].created is not None
        assert runs[after].created < ended, f"{after} was created only after {before} ended"
    assert all(r.state is not None and r.state.is_completed() for r in runs.values())


def test_a_round_failing_after_the_next_opened_commits_neither_and_resumes(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: round 1's server-side evaluation fails, after round 2 has opened
    stack, run_id = local_stack, f"pipe-fail-{uuid.uuid4().hex[:6]}"
    original = federated.evaluate_model

    @task(name="evaluate-model", cache_policy=NONE)
    async def evaluate_or_break(ctx: Any, rnd: int, model: Any) -> Any:
        if rnd == 1:
            raise RuntimeError("the evaluation of round 1 broke")
        return await original.fn(ctx, rnd, model)

    monkeypatch.setattr(federated, "evaluate_model", evaluate_or_break)
    sim = stack.simulate(JOB, 8, seed=6, dropout=0.0, offline_fraction=0.0, forever=True)

    # Execute
    with pytest.raises(RuntimeError, match="the evaluation of round 1 broke"):
        run_flow(**params(run_id))

    # Assert: round 0 committed; round 1 failed; round 2 ended Cancelled, not committed
    commit = read_commit(stack.store, JOB, run_id)
    assert commit is not None and commit.next_round == 1
    runs = asyncio.run(round_runs(run_id))
    assert runs["round-0001"].state is not None and runs["round-0001"].state.is_failed()
    cancelled = runs["round-0002"].state
    assert cancelled is not None and cancelled.is_cancelled()
    assert "round 2 was not committed" in (cancelled.message or "")
    assert "round 1" in (cancelled.message or "")

    # Execute: resume the run as it is, with a working evaluation
    monkeypatch.setattr(federated, "evaluate_model", original)
    reports = run_flow(**params(run_id))
    sim.stop()

    # Assert: rounds 1 and 2 were redone and each round is committed exactly once
    assert [r.round for r in reports] == [0, 1, 2]
    commit = read_commit(stack.store, JOB, run_id)
    assert commit is not None and commit.next_round == 3
    assert [r.round for r in read_reports(stack.store, commit)] == [0, 1, 2]
