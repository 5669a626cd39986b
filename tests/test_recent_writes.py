"""Reads of what this process just wrote, served from memory: only the exact bytes asked for."""

from __future__ import annotations

import pytest

from infra.errors import IntegrityError, StoreError
from infra.recent_writes import RecentWrites
from infra.settings import S3Settings
from infra.store import S3ObjectStore, StoredObject, sha256_hex


def stored(key: str, data: bytes) -> StoredObject:
    from infra.store import ObjectRef

    ref = ObjectRef(bucket="b", key=key, sha256=sha256_hex(data), size=len(data))
    return StoredObject(ref=ref, kind="partial", metadata={}, data=data)


def test_only_the_written_bytes_are_served_and_the_oldest_leave_first() -> None:
    recent = RecentWrites(budget_bytes=10)
    recent.remember(stored("a", b"12345"))
    recent.remember(stored("b", b"6789"))
    assert recent.get("a", sha256_hex(b"12345")) is not None
    assert recent.get("a", sha256_hex(b"other")) is None  # another version: ask S3
    recent.remember(stored("c", b"abc"))  # 12 bytes > 10: "a" goes
    assert recent.get("a", sha256_hex(b"12345")) is None
    assert recent.get("c", sha256_hex(b"abc")) is not None
    recent.remember(stored("huge", b"x" * 11))  # over the budget on its own: not kept
    assert recent.get("huge", sha256_hex(b"x" * 11)) is None
    assert recent.hits == 2


def test_a_store_reads_its_own_writes_from_memory_and_everything_else_from_s3(
    s3_env: S3Settings,
) -> None:
    # Prepare: the flow's kind of store, and a plain one beside it (a gateway)
    recent = RecentWrites()
    flow_store = S3ObjectStore(s3_env, recent=recent)
    other = S3ObjectStore(s3_env)
    ref = flow_store.put_bytes("r/partials/leaf-0", b"partial", kind="partial", metadata={"n": "1"})

    # Execute / Assert: the write read back by its hash is served here, metadata and all
    obj = flow_store.get(ref.key, expected_sha256=ref.sha256)
    assert (obj.data, obj.kind, obj.metadata, obj.ref) == (b"partial", "partial", {"n": "1"}, ref)
    assert recent.hits == 1

    # a read without an expected hash, or after another writer replaced it, asks S3
    other.put_bytes(ref.key, b"rewritten", kind="partial")
    assert flow_store.get(ref.key).data == b"rewritten"
    with pytest.raises(IntegrityError):  # S3 holds other bytes than the caller expects
        flow_store.get(ref.key, expected_sha256=sha256_hex(b"rewritten-not"))
    assert recent.hits == 1
    # the reference to the bytes this store wrote still gets exactly those bytes
    assert flow_store.get(ref.key, expected_sha256=ref.sha256).data == b"partial"
    assert recent.hits == 2

    # a deleted key is forgotten
    flow_store.delete(ref.key)
    assert recent.get(ref.key, ref.sha256) is None


def test_a_failed_put_is_never_served(s3_env: S3Settings) -> None:
    recent = RecentWrites()
    good = S3ObjectStore(s3_env, recent=recent)
    ref = good.put_bytes("k", b"v1", kind="test")
    broken = S3ObjectStore(
        s3_env.model_copy(update={"endpoint_url": "http://127.0.0.1:9", "create_bucket": False}),
        recent=recent,
    )
    with pytest.raises(StoreError):
        broken.put_bytes("k", b"v2", kind="test")
    assert recent.get("k", ref.sha256) is None
