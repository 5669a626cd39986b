"""Reads that S3 breaks off: retried, and never mistaken for corrupt data.

Two paths once lost acknowledged updates or crashed on a flaky network (they
were strict ``xfail`` here until fixed; docs/reliability.md tells the story):

* ``infra/store.py`` ``S3ObjectStore.get`` read the body outside botocore's
  retry, so a connection cut mid-download raised a botocore
  ``ResponseStreamingError`` instead of a ``StoreError`` and was not retried.
  It now sends the whole GET again (``GET_ATTEMPTS``) and ends in a
  ``StoreError``.
* ``tasks/intake.py`` ``LeafIntake.read_new`` marked a batch seen before
  reading it and counted any error, a transient one too, as ``corrupt-batch``:
  an S3 outage longer than boto3's six attempts dropped acknowledged updates.
  Only bytes that arrived and fail their hash or decoding are corrupt now; a
  batch S3 would not hand over is read again on the next poll.

They run Canopy's real S3 client against moto through a ``FaultyProxy``, take
seconds, and are not ``slow``. The leaf's side of it (reading again after the
close, failing loudly when S3 stays away) is unit-tested in tests/test_intake.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregation.collector import LeafCollector
from edge.update_batch import BatchContext, DeviceUpdate, encode_update_batch
from infra import store as store_module
from infra.errors import StoreError
from infra.keys import batch_name, update_batch_key
from infra.settings import S3Settings
from infra.store import GET_ATTEMPTS, S3ObjectStore
from tasks.intake import CORRUPT_BATCH, LeafIntake
from tests.support.faulty_s3 import FaultPlan, FaultyProxy
from tests.support.harness import write_round

JOB, RUN = "hello-mobile", "reads"
STATE = {"vector": np.zeros(8, dtype=np.float32)}


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


def test_a_download_cut_every_time_is_a_store_error(
    s3_settings: S3Settings, s3_store: S3ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "GET_BACKOFF_S", 0.01)
    s3_store.put_bytes("cut/always", b"x" * 10_000, kind="model")
    plan = FaultPlan(rate=1.0, kinds={"truncate": 1.0}, ops=frozenset({"GET"}), limit=GET_ATTEMPTS)
    with FaultyProxy(s3_settings.endpoint_url or "", plan) as proxy:
        store = S3ObjectStore(s3_settings.model_copy(update={"endpoint_url": proxy.url}))
        with pytest.raises(StoreError, match=f"broke off {GET_ATTEMPTS} times"):
            store.get("cut/always")
        assert proxy.stats().injected_total == GET_ATTEMPTS
        assert store.get("cut/always").data == b"x" * 10_000  # the limit is spent


def _one_acked_batch(s3_store: S3ObjectStore) -> tuple[LeafCollector, LeafIntake, str]:
    """A round with one leaf and one device whose update a gateway has stored (and acked)."""
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
    collector = LeafCollector(
        spec=task.specs(),
        task_id=task.task_id,
        model_version=task.model_version,
        selected=frozenset(task.selected_device_ids),
        adaptive=None,
    )
    return collector, LeafIntake(store=s3_store, task=task, collector=collector), key


def test_a_batch_unreadable_for_a_moment_is_still_aggregated(
    s3_settings: S3Settings, s3_store: S3ObjectStore
) -> None:
    collector, intake, key = _one_acked_batch(s3_store)

    # Its batch GET fails six times in a row (every attempt boto3 makes), then S3 is back.
    plan = FaultPlan(
        rate=1.0, kinds={"error500": 1.0}, ops=frozenset({"GET"}), path="/updates/", limit=6
    )
    with FaultyProxy(s3_settings.endpoint_url or "", plan) as proxy:
        intake.store = S3ObjectStore(s3_settings.model_copy(update={"endpoint_url": proxy.url}))
        intake.read_new()  # the outage: the batch stays unread, and is not judged corrupt
        assert key in intake.unreadable and not intake.settled
        assert collector.reported == set() and CORRUPT_BATCH not in collector.rejected
        intake.read_new()  # the next poll, as _stream_until_closed makes
        assert proxy.stats().injected_total == 6
    assert collector.reported == {"dev-1"}, dict(collector.rejected)
    assert intake.settled and intake.read_failures == 1 and intake.seen == {key}
    assert not collector.rejected
