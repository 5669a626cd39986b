"""The S3 key layout refuses segments that could escape their prefix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from infra import keys

ROOT = Path(__file__).resolve().parent.parent


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
    assert keys.evaluation_key("j", "r", 3) == "j/r/round-00003/evaluation.json"
    assert keys.program_layout_key("j", "r", 16) == "j/r/program-template-b16.pte.layout.json"
    assert keys.device_key("hello-mobile", "sim-0-00001") == "devices/hello-mobile/sim-0-00001.json"
    assert keys.registry_prefix("hello-mobile") == "devices/hello-mobile/"


def test_device_ids_and_jobs_in_registry_keys_are_checked() -> None:
    with pytest.raises(ValueError, match="device id"):
        keys.device_key("job", "../other")
    with pytest.raises(ValueError, match="job"):
        keys.registry_prefix("a/b")


def _layout_lines() -> dict[str, str]:
    """Pattern -> description, from the layout the module docstring draws."""
    doc = keys.__doc__ or ""
    return {
        line.split()[0]: line
        for line in doc.splitlines()
        if line.startswith("    ") and "/" in line.split()[0]
    }


def test_the_docstring_layout_is_what_the_functions_build() -> None:
    # Execute: fill every pattern of the docstring with example values
    examples = {
        "{job}": "j",
        "{run}": "r",
        "{r:05d}": "00007",
        "{B}": "16",
        "{leaf}": "leaf-0",
        "{batch}": "b1",
        "{node}": "agg-1",
        "{device_id}": "d1",
        "{key}": "j/r/commit.json",
        "{writer}": "gw-0-1-abc",
        "{seq:06d}": "000003",
        "{count}": "5",
    }
    drawn = set()
    for pattern in _layout_lines():
        for placeholder, value in examples.items():
            pattern = pattern.replace(placeholder, value)
        drawn.update(pattern.replace("(.layout.json)", "").split("|"))
        if "(.layout.json)" in pattern:
            drawn.add(pattern.replace("(.layout.json)", ".layout.json"))

    # Assert: the drawing and the functions agree, both ways
    built = {
        keys.commit_key("j", "r"),
        keys.global_model_key("j", "r", 7),
        keys.program_key("j", "r", 7),
        keys.program_template_key("j", "r", 16),
        keys.program_layout_key("j", "r", 16),
        keys.server_state_key("j", "r", 7),
        keys.evaluation_key("j", "r", 7),
        keys.task_manifest_key("j", "r", 7, "leaf-0"),
        keys.leaf_outcome_key("j", "r", 7, "leaf-0"),
        keys.update_batch_key("j", "r", 7, "leaf-0", "b1"),
        keys.partial_key("j", "r", 7, "agg-1"),
        keys.round_report_key("j", "r", 7),
        keys.evaluation_task_key("j", "r", 7, "leaf-0"),
        keys.evaluation_batch_key("j", "r", 7, "leaf-0", "b1"),
        keys.device_evaluation_key("j", "r", 7),
        keys.active_job_key("j"),
        keys.device_key("j", "d1"),
        keys.registry_shard_key("j", "gw-0-1-abc", 3, 5),
        keys.lineage_key("j/r/commit.json"),
    }
    assert drawn == built


# Key patterns that drifted from the code once: a registry without the job, a
# round placeholder without its five digits, round numbers of another width.
_DRIFT = [
    (re.compile(r"devices/\{(device_)?id\}\.json"), "devices/{job}/{device_id}.json"),
    (re.compile(r"round-\{r(\+1)?\}/"), "round-{r:05d}/"),
    (re.compile(r"round-N{1,4}/|round-N{6,}/"), "round-NNNNN/ (five digits)"),
    (re.compile(r"round-(\d{1,4}|\d{6,})/"), "round-00007/ (five digits)"),
]


@pytest.mark.parametrize(
    "doc",
    sorted(p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *ROOT.glob("docs/*.md")]),
)
def test_docs_use_the_key_layout_of_the_code(doc: str) -> None:
    text = (ROOT / doc).read_text()

    drift = [
        f"{doc}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()!r}, expected {want}"
        for pattern, want in _DRIFT
        for m in pattern.finditer(text)
    ]

    assert drift == []


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
