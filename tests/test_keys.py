"""The S3 key layout refuses segments that could escape their prefix."""

from __future__ import annotations

import pytest

from infra import keys


def test_layout_is_stable() -> None:
    assert keys.global_model_key("cifar10-mobile", "r1", 7) == (
        "cifar10-mobile/r1/round-00007/global.safetensors"
    )
    assert keys.program_key("j", "r", 0) == "j/r/round-00000/global.pte"
    assert keys.partial_key("j", "r", 2, "agg-1") == "j/r/round-00002/partials/agg-1.safetensors"
    assert keys.update_batch_key("j", "r", 1, "leaf-0", "b1") == (
        "j/r/round-00001/updates/leaf-0/b1.safetensors"
    )
    assert keys.commit_key("j", "r") == "j/r/commit.json"
    assert keys.lineage_key("j/r/commit.json") == "_lineage/j/r/commit.json.json"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-x", "a b", "x" * 200, "a..b", "abc\n"])
def test_bad_segments_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid key segment"):
        keys.run_prefix("job", bad)


def test_negative_round_is_refused() -> None:
    with pytest.raises(ValueError, match="round must be >= 0"):
        keys.round_prefix("j", "r", -1)


@pytest.mark.parametrize("uri", ["http://b/k", "s3://", "s3://bucket", "s3://bucket/"])
def test_bad_uris_are_refused(uri: str) -> None:
    with pytest.raises(ValueError, match="s3://BUCKET/KEY"):
        keys.parse_s3_uri(uri)
