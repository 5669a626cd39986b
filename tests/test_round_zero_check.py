"""Round 0's check across leaves as the leaf-level subflow runs it: Prefect tasks, S3.

The decision and the scaling are pure and tested in ``tests/aggregation``; this
test drives ``tasks.collect.check_leaves`` inside a flow on a real Prefect server
and a moto bucket, so the ``bound-leaf`` task's parameters, the bounded partial
in S3 and its lineage are what the round flow gets.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prefect import flow

from aggregation.clipping import ROUND_CLIP_REASON
from aggregation.collector import LeafCollector
from aggregation.partial import PartialAggregate
from aggregation.tensors import TensorSpec
from infra import keys
from infra.lineage import read_lineage
from infra.settings import GatewaySettings, S3Settings
from infra.store import S3ObjectStore
from tasks.collect import check_leaves
from tasks.context import RunContext
from tasks.params import TrainingParams
from tasks.results import Closing, LeafLevel, LeafOutcome

pytestmark = pytest.mark.slow
JOB, RUN = "hello-mobile", "zero-check"


def stored_leaf(store: S3ObjectStore, leaf: str, norms: list[float]) -> LeafOutcome:
    """A round-0 leaf's outcome as collect-leaf reports it, its partial in S3."""
    spec = {"w": TensorSpec((3,), "float32")}
    devices = [f"{leaf}-d{i}" for i in range(len(norms))]
    collector = LeafCollector(
        spec=spec, task_id="t", model_version="v", selected=frozenset(devices)
    )
    for device, norm in zip(devices, norms, strict=True):
        collector.offer(
            device_id=device,
            task_id="t",
            model_version="v",
            num_samples=10,
            tensors={"w": np.array([0.0, norm, 0.0], np.float32)},
            metrics={},
        )
    partial = collector.result()
    summary = collector.norm_summary(partial)
    ref = store.put_bytes(keys.partial_key(JOB, RUN, 0, leaf), partial.to_bytes(), kind="partial")
    return LeafOutcome(
        leaf=leaf,
        partial=ref,
        reported=len(norms),
        rejected={},
        rejection_examples={},
        clipped=dict(collector.clipped),
        norm_bound=collector.norm_bound,
        norms=summary.norms.to_json(),
        warmup_reference=summary.reference,
        largest_norm=summary.largest,
        duplicates=0,
        batches=1,
        bytes_in=100,
        finished_at=0.0,
    )


@flow(name="round-zero-check-test", validate_parameters=False)
async def run_check(ctx: RunContext, level: LeafLevel) -> LeafLevel:
    return await check_leaves(ctx, 0, level)


def test_the_leaf_level_bounds_a_lone_poisoned_leaf_in_s3(
    s3_settings: S3Settings, s3_store: S3ObjectStore, prefect_api: str
) -> None:
    # Prepare: three honest leaves and one whose only update is 1000x theirs
    leaves = [
        stored_leaf(s3_store, "leaf-0", [1.0, 1.4, 1.9]),
        stored_leaf(s3_store, "leaf-1", [1.2, 1.6]),
        stored_leaf(s3_store, "leaf-2", [1.1]),
        stored_leaf(s3_store, "leaf-3", [1500.0]),
    ]
    level = LeafLevel(
        closing=Closing(reason="enough-reports", reports_seen=7, closed_at=0.0), leaves=leaves
    )
    ctx = RunContext(
        TrainingParams.model_validate({"job": JOB, "run_id": RUN}), s3_settings, GatewaySettings()
    )

    # Execute
    checked = asyncio.run(run_check(ctx, level))

    # Assert: the honest leaves pass as they were; the poisoned one points at its
    # bounded partial, whose one update sits at the round's bound, and counts the clip
    assert checked.leaves[:3] == leaves[:3]
    bounded = checked.leaves[3]
    assert bounded.partial.key == keys.partial_key(JOB, RUN, 0, "leaf-3-bounded")
    assert bounded.clipped == {ROUND_CLIP_REASON: 1}
    assert bounded.norm_bound is not None and 4 * 1.4 < bounded.norm_bound < 4 * 1.4 * 1.2
    partial = PartialAggregate.from_bytes(
        s3_store.get(bounded.partial.key, expected_sha256=bounded.partial.sha256).data
    )
    assert float(partial.sums["w"][1]) / partial.weight == pytest.approx(bounded.norm_bound)
    record = read_lineage(s3_store, bounded.partial.key)
    assert record is not None and [i.uri for i in record.inputs] == [leaves[3].partial.uri]
