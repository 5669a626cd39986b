"""A leaf's intake when S3 misbehaves: corrupt bytes are judged once, unread batches wait.

Pure unit tests over ``MemoryObjectStore`` behind a store that fails on
demand. What they pin down: only a batch whose bytes arrived and fail their
hash or decoding counts ``corrupt-batch``; a batch (or a listing) S3 would not
hand over is read again on the next poll; after the round closed the leaf
reads again until every listed batch is in, or fails loudly with
``BatchesUnreadableError`` (the round is then not committed, and a resume
redoes it) instead of finishing without acknowledged updates.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest

from aggregation.collector import LeafCollector
from edge.update_batch import BatchContext, DeviceUpdate, encode_update_batch
from infra.errors import StoreError
from infra.keys import batch_name, update_batch_key
from infra.store import MemoryObjectStore, StoredObject
from tasks import leaf as collect  # the leaf's collection (tasks.collect re-exports it)
from tasks.intake import CORRUPT_BATCH, LeafIntake
from tests.support.harness import read_active, set_round_status, write_round

JOB, RUN = "hello-mobile", "intake"
STATE = {"vector": np.zeros(4, dtype=np.float32)}
DEVICES = ["dev-1", "dev-2", "dev-3"]


class FlakyStore(MemoryObjectStore):
    """A memory store whose GETs of chosen keys, or whose listings, fail for a while."""

    def __init__(self) -> None:
        super().__init__()
        self.failing_gets: Counter[str] = Counter()  # key -> GETs still to fail
        self.failing_lists = 0

    def get(self, key: str, *, expected_sha256: str | None = None) -> StoredObject:
        if self.failing_gets[key] > 0:
            self.failing_gets[key] -= 1
            raise StoreError(f"get {key} failed: InternalError (injected)")
        return super().get(key, expected_sha256=expected_sha256)

    def list_keys(self, prefix: str) -> list[str]:
        if self.failing_lists > 0 and "/updates/" in prefix:
            self.failing_lists -= 1
            raise StoreError(f"list {prefix} failed: SlowDown (injected)")
        return super().list_keys(prefix)


def _round(store: FlakyStore) -> LeafIntake:
    task = write_round(
        store, job=JOB, run_id=RUN, rnd=0, leaves=["leaf-0"], selected=DEVICES, state=STATE
    )["leaf-0"]
    collector = LeafCollector(
        spec=task.specs(),
        task_id=task.task_id,
        model_version=task.model_version,
        selected=frozenset(task.selected_device_ids),
        adaptive=None,
    )
    return LeafIntake(store=store, task=task, collector=collector)


def _batch(store: FlakyStore, intake: LeafIntake, device: str, seq: int) -> str:
    t = intake.task
    update = DeviceUpdate(
        device_id=device,
        task_id=t.task_id,
        model_version=t.model_version,
        num_samples=5,
        tensors={"vector": np.ones(4, dtype=np.float32)},
    )
    key = update_batch_key(JOB, RUN, 0, "leaf-0", batch_name("gw-a", seq, 0, 1))
    body = encode_update_batch([update], BatchContext(JOB, RUN, 0, "leaf-0", "gw-a"))
    store.put_bytes(key, body, kind="device-update-batch")
    return key


def test_corrupt_bytes_are_judged_once_and_never_read_again() -> None:
    store = FlakyStore()
    intake = _round(store)
    bad = _batch(store, intake, "dev-1", 1)
    store.corrupt(bad, b"flipped bits")  # the header's sha256 no longer matches
    garbage = update_batch_key(JOB, RUN, 0, "leaf-0", batch_name("gw-a", 2, 0, 1))
    store.put_bytes(garbage, b"not safetensors", kind="device-update-batch")

    intake.read_new()
    intake.read_new()

    assert intake.collector.rejected == {CORRUPT_BATCH: 2}
    assert intake.seen == {bad, garbage} and intake.settled and not intake.batches


def test_an_unread_batch_waits_for_the_next_poll_and_the_others_go_on() -> None:
    store = FlakyStore()
    intake = _round(store)
    first = _batch(store, intake, "dev-1", 1)
    second = _batch(store, intake, "dev-2", 2)
    store.failing_gets[first] = 2

    assert intake.read_new() == 1  # dev-2's batch is read despite dev-1's failing
    assert set(intake.unreadable) == {first} and not intake.settled
    assert intake.read_new() == 0  # still failing
    assert intake.read_new() == 1  # S3 is back

    assert intake.collector.reported == {"dev-1", "dev-2"}
    assert intake.seen == {first, second} and intake.settled
    assert intake.read_failures == 2 and not intake.collector.rejected


def test_a_failed_listing_is_not_settled_and_raises_nothing() -> None:
    store = FlakyStore()
    intake = _round(store)
    _batch(store, intake, "dev-1", 1)
    store.failing_lists = 1

    assert intake.read_new() == 0
    assert intake.list_error is not None and not intake.settled
    assert intake.read_new() == 1 and intake.settled


def test_a_batch_deleted_while_unreadable_is_not_waited_for() -> None:
    store = FlakyStore()
    intake = _round(store)
    key = _batch(store, intake, "dev-1", 1)
    store.failing_gets[key] = 1
    intake.read_new()
    store.delete(key)

    intake.read_new()

    assert intake.settled and not intake.collector.reported


def _close(store: FlakyStore) -> None:
    set_round_status(store, read_active(store, JOB), "closed")


def test_after_the_close_the_leaf_reads_until_every_batch_is_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(collect, "POLL_SECONDS", 0.01)
    store = FlakyStore()
    intake = _round(store)
    key = _batch(store, intake, "dev-1", 1)
    _batch(store, intake, "dev-2", 2)
    store.failing_gets[key] = 4  # the closing poll and three more fail
    _close(store)

    asyncio.run(collect._stream_until_closed(intake, store))

    assert intake.collector.reported == {"dev-1", "dev-2"} and intake.settled


def test_a_batch_still_unreadable_after_the_close_fails_the_leaf_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(collect, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(collect, "UNREADABLE_AFTER_CLOSE_S", 0.2)
    store = FlakyStore()
    intake = _round(store)
    key = _batch(store, intake, "dev-1", 1)
    store.failing_gets[key] = 10**6
    _close(store)

    with pytest.raises(collect.BatchesUnreadableError, match="resume the run") as failed:
        asyncio.run(collect._stream_until_closed(intake, store))

    assert key in str(failed.value) and not intake.collector.rejected


def test_a_complete_leaf_does_not_wait_for_unreadable_batches() -> None:
    store = FlakyStore()
    intake = _round(store)
    for seq, device in enumerate(DEVICES, start=1):
        _batch(store, intake, device, seq)
    stray = _batch(store, intake, "dev-1", 9)  # a retried upload, written twice
    store.failing_gets[stray] = 10**6
    _close(store)

    asyncio.run(collect._stream_until_closed(intake, store))

    assert intake.complete and stray in intake.unreadable
