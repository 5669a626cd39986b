"""The leaf level on the ``edge`` work pool, through the real stack.

A real Prefect server, moto over HTTP, two gateway threads, the device
simulator in its own process, and one real ``prefect worker start --pool edge
--type process`` worker, which runs each leaf's collection in a process of its
own (``flows.edge_leaf``). The same job with the same seed runs once with its
leaves in the flow's process and once on the edge pool: every round's global
model is the same tensors bit for bit, and the edge-leaf runs hang under the
leaf-level subflow in Prefect's run tree (what the UI draws).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun

from aggregation.clipping import NormBoundState
from aggregation.tensors import decode_tensors
from edge.manifests import LeafTask
from flows.edge_leaf import EdgeLeafError, run_leaf
from infra import keys
from infra.run_state import RoundReport
from infra.settings import GatewaySettings, S3Settings
from infra.store import ObjectRef, S3ObjectStore, get_json
from tasks.context import RunContext
from tasks.params import TrainingParams
from tests.support.stack import LocalStack, edge_workers, run_flow, small_run

pytestmark = pytest.mark.slow

JOB = "hello-mobile"
# Four always-on phones on two leaves: the simulator's seed 0 routes two to each leaf
DEVICES = 4
LEAVES = ["leaf-0", "leaf-1"]


@pytest.fixture(scope="module")
def edge_pool(
    prefect_api: str, moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[str]]:
    """One edge worker for this module's tests (S3's endpoint is the session's moto)."""
    s3 = S3Settings(
        endpoint_url=moto_endpoint,
        access_key_id="testing",
        secret_access_key="testing",  # type: ignore[arg-type]
    )
    with edge_workers(prefect_api, s3, 1, tmp_path_factory.mktemp("edge-workers")) as names:
        yield names


def model_digest(store: S3ObjectStore, key: str) -> str:
    """sha256 of a model's tensors (names, dtypes, shapes, bytes), not of its file's
    metadata, which names the run."""
    tensors, _ = decode_tensors(store.get(key).data, source=key)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = tensors[name]
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def devices_per_leaf(store: S3ObjectStore, run_id: str, rnd: int) -> list[int]:
    found = []
    for leaf in LEAVES:
        task = get_json(store, keys.task_manifest_key(JOB, run_id, rnd, leaf))
        found.append(len(LeafTask.model_validate(task).selected_device_ids))
    return found


def run_job(run_id: str, **params: object) -> list[RoundReport]:
    return run_flow(
        **small_run(
            job=JOB,
            run_id=run_id,
            rounds=2,
            tree={"depth": 1, "width": len(LEAVES)},
            cohort_size=DEVICES,
            over_selection=1.0,
            min_reports=DEVICES,
            num_devices=DEVICES,
            partition={"kind": "iid"},
            round_deadline_s=120,  # ample on a busy machine: rounds close on their reports
            **params,
        )
    )


async def child_runs(parent: UUID) -> list[FlowRun]:
    async with get_client() as client:
        return await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])
            )
        )


async def leaf_level_runs(run_id: str) -> dict[str, FlowRun]:
    """The run's leaf-level subflow runs by name, found through the round flow runs."""
    async with get_client() as client:
        runs = await client.read_flow_runs(limit=200)
    top = [r for r in runs if r.parameters.get("run_id") == run_id]
    assert len(top) == 1, f"one federated-training run of {run_id}, got {len(top)}"
    levels: dict[str, FlowRun] = {}
    for rnd in await child_runs(top[0].id):
        levels |= {r.name: r for r in await child_runs(rnd.id) if r.name.endswith("-leaves")}
    return levels


def test_leaves_on_the_edge_pool_give_the_same_model_bit_for_bit(
    local_stack: LocalStack, edge_pool: list[str]
) -> None:
    # Prepare
    stack, tag = local_stack, uuid.uuid4().hex[:6]
    here, edge = f"in-process-{tag}", f"edge-pool-{tag}"

    sim = stack.simulate(JOB, DEVICES, forever=True, dropout=0.0, offline_fraction=0.0)

    # Execute: the same job and seed, leaves in the flow's process, then on the edge pool
    local = run_job(here)
    remote = run_job(edge, leaf_mode="edge-pool")
    sim.stop()

    # Assert: both committed every round with every device, to the same tensors
    assert [r.outcome for r in local] == [r.outcome for r in remote] == ["committed"] * 2
    assert [r.devices_reported for r in remote] == [DEVICES, DEVICES]
    for rnd in range(2):
        # at most two updates per leaf: float sums of two are the same in either order
        assert max(devices_per_leaf(stack.store, edge, rnd)) <= 2
        for node in LEAVES:
            assert model_digest(
                stack.store, keys.partial_key(JOB, here, rnd, node)
            ) == model_digest(stack.store, keys.partial_key(JOB, edge, rnd, node))
        assert model_digest(stack.store, keys.global_model_key(JOB, here, rnd + 1)) == model_digest(
            stack.store, keys.global_model_key(JOB, edge, rnd + 1)
        )
        # the edge leaves handed their outcomes over through S3, not Prefect results
        assert stack.store.head(keys.leaf_outcome_key(JOB, edge, rnd, "leaf-0"))
        assert not stack.store.head(keys.leaf_outcome_key(JOB, here, rnd, "leaf-0"))

    # Assert: in Prefect's run tree each leaf-level subflow has one edge-leaf child per
    # leaf, completed, on the edge pool; in-process leaf levels have none
    levels = asyncio.run(leaf_level_runs(edge))
    assert sorted(levels) == ["r0000-level-0-leaves", "r0001-level-0-leaves"]
    for name, level in levels.items():
        children = asyncio.run(child_runs(level.id))
        assert sorted(c.name for c in children) == [f"{name[:5]}-{leaf}" for leaf in LEAVES]
        assert all(c.state is not None and c.state.is_completed() for c in children)
        assert all(c.work_pool_name == "edge" for c in children)
    for level in asyncio.run(leaf_level_runs(here)).values():
        assert asyncio.run(child_runs(level.id)) == []


def test_a_failed_leaf_run_fails_the_leaf_level_loudly(
    s3_env: S3Settings, edge_pool: list[str]
) -> None:
    """A leaf run that fails on its worker (here: its task is not in S3) raises, naming the
    run, its state and the way out; the round is then not committed."""
    # Prepare
    missing = ObjectRef(bucket=s3_env.bucket, key="nowhere/tasks/leaf-0.json", sha256="0", size=0)
    params = TrainingParams(job=JOB, run_id=f"fails-{uuid.uuid4().hex[:6]}", round_deadline_s=5)
    ctx = RunContext(params=params, s3=s3_env, gateway=GatewaySettings())

    # Execute
    with pytest.raises(EdgeLeafError, match="ended FAILED") as failed:
        asyncio.run(run_leaf(ctx, 0, "leaf-0", missing, NormBoundState()))

    # Assert
    assert "resume the run by its id" in str(failed.value)
