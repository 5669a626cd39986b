"""Round 0's check across leaves as the leaf-level subflow runs it: Prefect tasks, S3.

The decision and the scaling are pure and tested in ``tests/aggregation``; this
test drives ``tasks.collect.check_leaves`` inside a flow on a real Prefect server
and a moto bucket, so the ``bound-leaf`` task's parameters, the bounded partial
in S3 and its lineage are what the round flow gets.
"""

from __future__ import annotations

import asyncio

import pytest
from prefect import flow

from aggregation.clipping import ROUND_CLIP_REASON
from aggregation.partial import PartialAggregate
from infra import keys
from infra.lineage import read_lineage
from infra.settings import GatewaySettings, S3Settings
from infra.store import S3ObjectStore
from tasks.collect import check_leaves
from tasks.context import RunContext
from tasks.params import TrainingParams
from tasks.results import Closing, LeafLevel
from tests.support.outcomes import stored_leaf

pytestmark = pytest.mark.slow
JOB, RUN = "hello-mobile", "zero-check"


@flow(name="round-zero-check-test", validate_parameters=False)
async def run_check(ctx: RunContext, level: LeafLevel) -> LeafLevel:
    return await check_leaves(ctx, 0, level)


def test_the_leaf_level_bounds_a_lone_poisoned_leaf_in_s3(
    s3_settings: S3Settings, s3_store: S3ObjectStore, prefect_api: str
) -> None:
    # Prepare: three honest leaves and one whose only update is 1000x theirs
    leaves = [
        stored_leaf(s3_store, "leaf-0", [1.0, 1.4, 1.9], run_id=RUN, axis=1),
        stored_leaf(s3_store, "leaf-1", [1.2, 1.6], run_id=RUN, axis=1),
        stored_leaf(s3_store, "leaf-2", [1.1], run_id=RUN, axis=1),
        stored_leaf(s3_store, "leaf-3", [1500.0], run_id=RUN, axis=1),
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
