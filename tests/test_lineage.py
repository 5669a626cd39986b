"""Lineage ledger: records, walking ancestry, and the ``canopy lineage`` command."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from flows.cli import app
from infra.lineage import make_record, read_lineage, walk_lineage, write_lineage
from infra.settings import S3Settings
from infra.store import MemoryObjectStore, ObjectStore, S3ObjectStore


def _chain(store: ObjectStore) -> tuple[str, str]:
    """Init model -> export -> two leaf partials -> new global; returns (init, global) URIs."""
    t0 = datetime.now(UTC)
    init = store.put_bytes("job/run/round-00000/global.safetensors", b"w0", kind="model")
    write_lineage(
        store, make_record(kind="initial-model", inputs=[], outputs=[init], started_at=t0)
    )
    pte = store.put_bytes("job/run/round-00000/global.pte", b"pte", kind="program")
    write_lineage(
        store,
        make_record(
            kind="executorch-export",
            inputs=[init],
            outputs=[pte],
            parameters={"job": "xor-mobile"},
            started_at=t0,
            flow_run_id="fr-1",
        ),
    )
    leaves = []
    for leaf in ("leaf-0", "leaf-1"):
        ref = store.put_bytes(
            f"job/run/round-00000/partials/{leaf}.safetensors", leaf.encode(), kind="partial"
        )
        write_lineage(
            store,
            make_record(kind="partial-aggregation", inputs=[pte], outputs=[ref], started_at=t0),
        )
        leaves.append(ref)
    new = store.put_bytes("job/run/round-00001/global.safetensors", b"w1", kind="model")
    write_lineage(
        store,
        make_record(
            kind="global-aggregation",
            inputs=[init, *leaves],
            outputs=[new],
            parameters={"strategy": "fedavg"},
            started_at=t0,
        ),
    )
    return init.uri, new.uri


def test_record_carries_versions_and_times() -> None:
    store = MemoryObjectStore()
    out = store.put_bytes("k", b"x", kind="t")
    rec = make_record(kind="evaluation", inputs=[], outputs=[out], started_at=datetime.now(UTC))
    assert rec.versions["torch"].startswith("2.")
    assert rec.finished_at >= rec.started_at
    write_lineage(store, rec)
    assert read_lineage(store, "k") == rec


def test_walk_reaches_initial_model_and_shares_common_ancestors() -> None:
    store = MemoryObjectStore()
    init_uri, new_uri = _chain(store)
    root = walk_lineage(store, new_uri)
    assert root.record is not None and root.record.kind == "global-aggregation"
    kinds = {p.uri: p.record.kind for p in root.parents if p.record}
    assert kinds[init_uri] == "initial-model"
    leaf = next(p for p in root.parents if p.uri.endswith("leaf-0.safetensors"))
    (pte,) = leaf.parents
    assert pte.record is not None and pte.record.flow_run_id == "fr-1"
    assert pte.parents[0].uri == init_uri
    assert all(p.problem is None for p in root.parents)


def test_replaced_input_shows_as_broken_link() -> None:
    store = MemoryObjectStore()
    init_uri, new_uri = _chain(store)
    store.put_bytes("job/run/round-00000/global.safetensors", b"swapped", kind="model")
    root = walk_lineage(store, new_uri)
    init = next(p for p in root.parents if p.uri == init_uri)
    assert init.problem is not None and "sha256 changed" in init.problem


def test_lineage_output_outside_bucket_is_refused() -> None:
    store = MemoryObjectStore(bucket="a")
    other = MemoryObjectStore(bucket="b").put_bytes("k", b"x", kind="t")
    rec = make_record(kind="evaluation", inputs=[], outputs=[other], started_at=datetime.now(UTC))
    with pytest.raises(Exception, match="not in bucket"):
        write_lineage(store, rec)


def test_canopy_lineage_prints_tree_from_s3(s3_store: S3ObjectStore, s3_env: S3Settings) -> None:
    _, new_uri = _chain(s3_store)
    result = CliRunner().invoke(app, ["lineage", new_uri], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "global-aggregation" in result.output
    assert "executorch-export" in result.output
    assert "initial-model" in result.output
    assert "round-00000/global.safetensors" in result.output


def test_canopy_lineage_rejects_bad_uri() -> None:
    result = CliRunner().invoke(app, ["lineage", "not-a-uri"])
    assert result.exit_code == 2
    assert "s3://BUCKET/KEY" in result.output
