"""The whole system through its real parts.

A real Prefect server (SQLite), a moto S3 server over HTTP, two gateway workers
under uvicorn, and the device simulator in its own process speaking only the
public HTTP protocol. The ``federated-training`` flow runs in this process
against that server, exactly as the deployment's runner would run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from infra import keys
from infra.lineage import LineageNode, walk_lineage
from infra.run_state import read_commit, read_reports
from tasks.ui import artifact_key
from tests.support.stack import ALWAYS_ON, REPO, LocalStack, run_flow, small_run

pytestmark = pytest.mark.slow


def lineage_kinds(node: LineageNode) -> set[str]:
    kinds = {node.record.kind} if node.record else set()
    for parent in node.parents:
        kinds |= lineage_kinds(parent)
    return kinds


def lineage_problems(node: LineageNode) -> list[str]:
    found = [f"{node.uri}: {node.problem}"] if node.problem else []
    for parent in node.parents:
        found += lineage_problems(parent)
    return found


def reaches_initial_model(node: LineageNode) -> bool:
    if node.record is not None and node.record.kind == "initial-model":
        return True
    return any(reaches_initial_model(p) for p in node.parents)


async def artifact_keys(prefix: str) -> set[str]:
    async with get_client() as client:
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=prefix)), limit=200
        )
    return {a.key for a in arts if a.key}


def test_hello_mobile_end_to_end(local_stack: LocalStack) -> None:
    # Prepare
    stack = local_stack
    run_id = f"hello-{uuid.uuid4().hex[:6]}"
    sim = stack.simulate("hello-mobile", 12, dropout=0.0, offline_fraction=0.0)

    # Execute
    reports = run_flow(
        **small_run(
            job="hello-mobile",
            run_id=run_id,
            rounds=2,
            tree={"depth": 2, "width": 2},
            cohort_size=6,
            min_reports=3,
            num_devices=12,
        )
    )
    summary = sim.finish(timeout=60)

    # Assert: every round committed with the cohort it asked for
    assert [r.outcome for r in reports] == ["committed", "committed"]
    assert all(r.devices_reported >= 6 for r in reports)
    assert reports[1].train_loss is not None and reports[0].train_loss is not None
    assert reports[1].train_loss < reports[0].train_loss  # the vector moves to the targets
    commit = read_commit(stack.store, "hello-mobile", run_id)
    assert commit is not None and commit.next_round == 2

    # Each round's objects exist in S3
    for rnd in range(2):
        for node in ("leaf-0", "leaf-3", "agg-1-0", "agg-1-1", "root"):
            assert stack.store.head(keys.partial_key("hello-mobile", run_id, rnd, node))
        assert stack.store.head(keys.task_manifest_key("hello-mobile", run_id, rnd, "leaf-0"))
        assert stack.store.list_keys(keys.round_prefix("hello-mobile", run_id, rnd) + "updates/")
        assert stack.store.head(keys.global_model_key("hello-mobile", run_id, rnd + 1))

    # One unbroken lineage chain from the final model back to the initial one
    tree = walk_lineage(stack.store, commit.global_model.uri)
    assert lineage_problems(tree) == []
    assert reaches_initial_model(tree)
    assert {
        "global-aggregation",
        "partial-aggregation",
        "device-update-batch",
        "initial-model",
    } <= lineage_kinds(tree)

    # The Prefect UI has the round tables, links and the job summary
    found = asyncio.run(artifact_keys(artifact_key("hello-mobile", run_id) + "%"))
    assert artifact_key("hello-mobile", run_id, "round-0000") in found
    assert artifact_key("hello-mobile", run_id, "round-0001", "global model") in found
    assert artifact_key("hello-mobile", run_id, "summary") in found

    # The devices heard an answer for every update the rounds counted (6+ each): accepted,
    # or 409 late when the round closed while its batch was written (it may still be
    # aggregated, docs/gateway.md); and no acknowledged update is missing from the rounds.
    assert summary["stop_reason"] == "done"
    assert summary["accepted"] + summary["late"] >= 12
    assert summary["accepted"] <= sum(r.devices_reported for r in reports)


def test_xor_mobile_reaches_full_accuracy_with_executorch_devices(local_stack: LocalStack) -> None:
    stack = local_stack
    run_id = f"xor-{uuid.uuid4().hex[:6]}"
    sim = stack.simulate("xor-mobile", 6, **ALWAYS_ON)
    reports = run_flow(
        **small_run(
            job="xor-mobile",
            run_id=run_id,
            runtime="executorch",
            rounds=4,
            cohort_size=4,
            min_reports=2,
            num_devices=6,
        )
    )
    sim.finish(timeout=60)
    assert all(r.outcome == "committed" for r in reports)
    assert all(r.program is not None for r in reports)  # devices trained an ExecuTorch program
    assert reports[-1].test_accuracy == 1.0
    tree = walk_lineage(stack.store, reports[-1].global_model.uri)
    assert "executorch-export" in lineage_kinds(tree) and lineage_problems(tree) == []


def test_round_without_enough_devices_is_abandoned_not_hung(local_stack: LocalStack) -> None:
    stack = local_stack
    run_id = f"few-{uuid.uuid4().hex[:6]}"
    sim = stack.simulate("hello-mobile", 2, seed=7, dropout=0.0, offline_fraction=0.0)
    started = time.monotonic()
    reports = run_flow(
        **small_run(
            job="hello-mobile",
            run_id=run_id,
            rounds=1,
            cohort_size=5,
            min_reports=5,
            round_deadline_s=6,
            registry_wait_s=5,
            num_devices=2,
            partition={"kind": "iid"},
        )
    )
    sim.finish(timeout=60)
    assert time.monotonic() - started < 60
    (report,) = reports
    assert report.outcome == "abandoned" and "min_reports=5" in report.reason
    commit = read_commit(stack.store, "hello-mobile", run_id)
    assert commit is not None and commit.next_round == 1
    assert commit.global_model.key == keys.global_model_key("hello-mobile", run_id, 0)


def test_killed_and_resumed_job_commits_each_round_once(local_stack: LocalStack) -> None:
    stack = local_stack
    run_id = f"resume-{uuid.uuid4().hex[:6]}"
    params = small_run(
        job="hello-mobile",
        run_id=run_id,
        cohort_size=4,
        min_reports=2,
        num_devices=8,
        partition={"kind": "iid"},
    )
    sim = stack.simulate("hello-mobile", 8, seed=3, dropout=0.0, offline_fraction=0.0)
    # Run the flow in a subprocess and kill it once round 0 is committed.
    code = (
        "import asyncio, json, sys; from flows.federated import federated_training; "
        "asyncio.run(federated_training(**json.loads(sys.argv[1])))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(params)],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while (c := read_commit(stack.store, "hello-mobile", run_id)) is None or c.next_round < 1:
        assert time.monotonic() < deadline and proc.poll() is None, "round 0 never committed"
        time.sleep(0.2)
    proc.kill()
    proc.wait()

    reports = run_flow(**params)
    sim.finish(timeout=60)

    commit = read_commit(stack.store, "hello-mobile", run_id)
    assert commit is not None and commit.next_round == 3
    stored = read_reports(stack.store, commit)
    assert [r.round for r in stored] == [0, 1, 2]
    assert [r.round for r in reports] == [0, 1, 2]
    tree = walk_lineage(stack.store, commit.global_model.uri)
    assert lineage_problems(tree) == [] and reaches_initial_model(tree)
