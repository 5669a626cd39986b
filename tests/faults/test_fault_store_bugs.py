"""Faults that get through today: each test shows one bug in another owner's file.

They are strict ``xfail``: they run in CI, fail as long as the bug is there,
and turn into a failure (XPASS) the day it is fixed, to be unmarked then. The
bugs, their causes and the proposed fixes are in docs/reliability.md
("Known gaps"). Each takes a few seconds and is not ``slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregation.collector import LeafCollector
from edge.update_batch import BatchContext, DeviceUpdate, encode_update_batch
from infra.keys import batch_name, update_batch_key
from infra.settings import S3Settings
from infra.store import S3ObjectStore
from tasks.intake import LeafIntake
from tests.support.faulty_s3 import FaultPlan, FaultyProxy
from tests.support.harness import write_round

JOB, RUN = "hello-mobile", "bugs"
STATE = {"vector": np.zeros(8, dtype=np.float32)}


@pytest.mark.xfail(
    strict=True,
    reason="infra/store.py S3ObjectStore.get reads the body outside botocore's retry: a "
    "connection cut mid-download raises botocore ResponseStreamingError (not a StoreError) "
    "and is not retried",
)
def test_a_download_cut_mid_body_is_retried(
    s3_settings: S3Settings, s3_store: S3ObjectStore
) -> None:
    data = bytes(range(256)) * 400
    s3_store.put_bytes("cut/model", data, kind="model")
    plan = FaultPlan(rate=1.0, kinds={"truncate": 1.0}, ops=frozenset({"GET"}), limit=1)
    with FaultyProxy(s3_settings.endpoint_url or "", plan) as proxy:
        store = S3ObjectStore(s3_settings.model_copy(update={"endpoint_url": proxy.url}))
        try:
            got = store.get("cut/model").data
        finally:
            assert proxy.stats().injected == {("GET", "truncate"): 1}
    assert got == data


@pytest.mark.xfail(
    strict=True,
    reason="tasks/intake.py LeafIntake.read_new marks a batch seen before reading it and "
    "counts any CanopyError (a transient StoreError too) as corrupt-batch: an S3 outage "
    "longer than boto3's 6 attempts drops acknowledged updates from a committed round",
)
def test_a_batch_unreadable_for_a_moment_is_still_aggregated(
    s3_settings: S3Settings, s3_store: S3ObjectStore
) -> None:
    # A round with one leaf and one device whose update a gateway has stored (and acked).
    tasks = write_round(
        s3_store, job=JOB, run_id=RUN, rnd=0, leaves=["leaf-0"], selected=["dev-1"], state=STATE
    )
    task = tasks["leaf-0"]
    update = DeviceUpdate(
        device_id="dev-1",
        task_id=task.task_id,
        model_version=task.model_version,
        num_samples=10,
        tensors={"vector": np.ones(8, dtype=np.float32)},
    )
    key = update_batch_key(JOB, RUN, 0, "leaf-0", batch_name("gw-a", 1, 0, 1))
    context = BatchContext(JOB, RUN, 0, "leaf-0", "gw-a")
    s3_store.put_bytes(key, encode_update_batch([update], context), kind="device-update-batch")

    # Its batch GET fails six times in a row (every attempt boto3 makes), then S3 is back.
    plan = FaultPlan(
        rate=1.0, kinds={"error500": 1.0}, ops=frozenset({"GET"}), path="/updates/", limit=6
    )
    with FaultyProxy(s3_settings.endpoint_url or "", plan) as proxy:
        store = S3ObjectStore(s3_settings.model_copy(update={"endpoint_url": proxy.url}))
        collector = LeafCollector(
            spec=task.specs(),
            task_id=task.task_id,
            model_version=task.model_version,
            selected=frozenset(task.selected_device_ids),
            adaptive=None,
        )
        intake = LeafIntake(store=store, task=task, collector=collector)
        for _ in range(3):  # the leaf polls again, as _stream_until_closed does
            try:
                intake.read_new()
            except Exception:  # failing loudly would be fine too: the round could be redone
                continue
        assert proxy.stats().injected_total == 6
    assert collector.reported == {"dev-1"}, dict(collector.rejected)
