"""Lineage records written beside the round: after their objects, awaited before the commit."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from infra.keys import lineage_key
from infra.outputs import Output, Provenance, put_with_lineage
from infra.store import MemoryObjectStore
from tasks.deferred import DeferredWrites, deferred, settle
from tasks.run_cache import run_cache

PROVENANCE = Provenance(
    kind="partial-aggregation",
    inputs=[],
    parameters={"node": "agg-1-0"},
    started_at=datetime(2026, 12, 7, tzinfo=UTC),
)


def test_outside_a_run_the_record_is_written_in_place() -> None:
    store = MemoryObjectStore()
    ref = put_with_lineage(
        store, Output("p/agg", b"sum", kind="partial"), PROVENANCE, later=deferred(0)
    )
    assert store.head(lineage_key(ref.key)) is not None


def test_in_a_run_the_record_follows_its_object_and_the_round_waits_for_it() -> None:
    store = MemoryObjectStore()
    heard: list[str] = []
    with run_cache():
        ref = put_with_lineage(
            store,
            Output("p/agg", b"sum", kind="partial"),
            PROVENANCE,
            observers=[lambda record: heard.append(record.kind)],
            later=deferred(3),
        )
        assert store.head(ref.key) is not None  # the object is there when the step returns
        settle(3)
        assert store.head(lineage_key(ref.key)) is not None
        assert heard == ["partial-aggregation"]
        settle(3)  # nothing left: returns at once


def test_a_record_that_cannot_be_written_fails_the_rounds_settle_only() -> None:
    writes = DeferredWrites()

    def broken() -> None:
        raise OSError("S3 refused the record")

    writes.later(1)(broken)  # type: ignore[arg-type]
    writes.later(2)(lambda: None)  # type: ignore[arg-type,return-value]
    writes.settle(2)  # another round's failure is not this round's
    with pytest.raises(OSError, match="refused the record"):
        writes.settle(1)
    writes.close()
