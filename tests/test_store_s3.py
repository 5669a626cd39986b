"""S3ObjectStore against a real moto server over HTTP."""

from __future__ import annotations

import pytest

from infra.errors import IntegrityError, ObjectNotFoundError
from infra.store import S3ObjectStore, get_json, put_json, sha256_hex


def test_put_get_round_trip_records_sha256(s3_store: S3ObjectStore) -> None:
    ref = s3_store.put_bytes("a/b.bin", b"hello", kind="test", metadata={"round": "3"})
    obj = s3_store.get("a/b.bin", expected_sha256=ref.sha256)
    assert obj.data == b"hello"
    assert obj.ref.sha256 == sha256_hex(b"hello") == ref.sha256
    assert obj.kind == "test"
    assert obj.metadata == {"round": "3"}
    assert ref.uri == f"s3://{s3_store.bucket}/a/b.bin"


def test_corrupted_object_is_refused(s3_store: S3ObjectStore) -> None:
    ref = s3_store.put_bytes("m.bin", b"original", kind="test")
    # Overwrite the body but keep the old header, as a bit flip or a hand edit would.
    s3_store._client.put_object(
        Bucket=s3_store.bucket,
        Key="m.bin",
        Body=b"tampered",
        Metadata={"canopy-sha256": ref.sha256, "canopy-kind": "test", "canopy-format": "1"},
    )
    with pytest.raises(IntegrityError, match="does not match the recorded"):
        s3_store.get("m.bin")


def test_expected_hash_mismatch_is_refused(s3_store: S3ObjectStore) -> None:
    s3_store.put_bytes("m.bin", b"v1", kind="test")
    with pytest.raises(IntegrityError, match="not the expected"):
        s3_store.get("m.bin", expected_sha256=sha256_hex(b"v0"))


def test_foreign_object_without_header_is_refused(s3_store: S3ObjectStore) -> None:
    s3_store._client.put_object(Bucket=s3_store.bucket, Key="foreign", Body=b"x")
    with pytest.raises(IntegrityError, match="no canopy-sha256"):
        s3_store.get("foreign")


def test_missing_object_is_a_clear_error(s3_store: S3ObjectStore) -> None:
    with pytest.raises(ObjectNotFoundError, match="does not exist"):
        s3_store.get("nope")
    assert s3_store.head("nope") is None


def test_reserved_and_bad_metadata_are_refused(s3_store: S3ObjectStore) -> None:
    with pytest.raises(ValueError, match="reserved"):
        s3_store.put_bytes("k", b"", kind="t", metadata={"canopy-sha256": "x"})
    with pytest.raises(ValueError, match="lowercase"):
        s3_store.put_bytes("k", b"", kind="t", metadata={"Bad Name": "x"})


def test_json_and_listing(s3_store: S3ObjectStore) -> None:
    put_json(s3_store, "p/one.json", {"b": 1, "a": [1, 2]}, kind="manifest")
    put_json(s3_store, "p/two.json", {"x": None}, kind="manifest")
    assert get_json(s3_store, "p/one.json") == {"a": [1, 2], "b": 1}
    assert s3_store.list_keys("p/") == ["p/one.json", "p/two.json"]
