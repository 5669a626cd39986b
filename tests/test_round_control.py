"""Opening and closing rounds through S3 control objects, and writing outputs with lineage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from aggregation.tensors import encode_tensors
from edge.round_control import (
    active_round,
    leaf_tasks,
    open_round,
    read_active,
    round_is_open,
    set_round_status,
)
from infra.keys import active_job_key, lineage_key, task_manifest_key
from infra.lineage import read_lineage
from infra.outputs import Output, Provenance, put_all_with_lineage, put_with_lineage
from infra.store import MemoryObjectStore, ObjectStore, get_json

NOW = datetime(2026, 12, 1, tzinfo=UTC)


class RecordingStore(MemoryObjectStore):
    """Remembers the order of writes, to check the pointer goes last."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def put_bytes(self, key: str, data: bytes, **kw: object):  # type: ignore[no-untyped-def,override]
        self.writes.append(key)
        return super().put_bytes(key, data, **kw)  # type: ignore[arg-type]


def _open(store: ObjectStore, rnd: int = 1) -> None:
    model = store.put_bytes(
        "m.safetensors", encode_tensors({"w": np.zeros(2, np.float32)}), kind="model"
    )
    tasks = leaf_tasks(
        job="hello-mobile",
        run_id="r1",
        rnd=rnd,
        selected_by_leaf={"leaf-0": ["a", "b"], "leaf-1": []},
        global_model=model,
        program=None,
        tensor_spec={"w": ([2], "float32")},
        hyperparams={"lr": 0.1},
        runtime="pytorch",
        deadline=NOW + timedelta(minutes=1),
    )
    pointer = active_round(
        job="hello-mobile",
        run_id="r1",
        rnd=rnd,
        leaves=["leaf-0", "leaf-1"],
        status="open",
        opened_at=NOW,
    )
    open_round(store, tasks, pointer)


def test_open_round_writes_every_task_before_the_pointer() -> None:
    store = RecordingStore()
    _open(store)
    tasks = [task_manifest_key("hello-mobile", "r1", 1, leaf) for leaf in ("leaf-0", "leaf-1")]
    assert store.writes[-1] == active_job_key("hello-mobile")
    assert sorted(store.writes[1:-1]) == sorted(tasks)
    assert get_json(store, tasks[0])["selected_device_ids"] == ["a", "b"]


def test_round_is_open_only_for_its_own_run_and_round_until_closed() -> None:
    store = MemoryObjectStore()
    assert read_active(store, "hello-mobile") is None
    assert not round_is_open(store, "hello-mobile", "r1", 1)
    _open(store)
    assert round_is_open(store, "hello-mobile", "r1", 1)
    assert not round_is_open(store, "hello-mobile", "r1", 0)
    assert not round_is_open(store, "hello-mobile", "r2", 1)
    active = read_active(store, "hello-mobile")
    assert active is not None
    closed = set_round_status(store, active, "closed", at=NOW)
    assert closed.closed_at == NOW and not round_is_open(store, "hello-mobile", "r1", 1)


def test_open_round_refuses_a_pointer_that_is_not_open_or_misses_a_leaf() -> None:
    store = MemoryObjectStore()
    pointer = active_round(
        job="j", run_id="r", rnd=0, leaves=["leaf-0"], status="closed", opened_at=NOW
    )
    with pytest.raises(ValueError, match="open pointer"):
        open_round(store, {}, pointer)
    with pytest.raises(ValueError, match="no task for leaves"):
        open_round(store, {}, pointer.model_copy(update={"status": "open"}))
    assert store.list_keys("") == []


def test_put_with_lineage_writes_the_object_then_its_record_and_tells_observers() -> None:
    store = MemoryObjectStore()
    heard: list[str] = []
    parent = store.put_bytes("in.bin", b"parent", kind="model")
    ref = put_with_lineage(
        store,
        Output("out.bin", b"child", kind="partial", metadata={"round": "1"}),
        Provenance(
            kind="partial-aggregation",
            inputs=[parent],
            parameters={"node": "leaf-0"},
            started_at=NOW,
            flow_run_id="fr-1",
        ),
        observers=[lambda rec: heard.append(rec.kind)],
    )
    record = read_lineage(store, "out.bin")
    assert record is not None and store.head(lineage_key("out.bin")) is not None
    assert [o.sha256 for o in record.outputs] == [ref.sha256]
    assert [i.uri for i in record.inputs] == [parent.uri]
    assert record.parameters == {"node": "leaf-0"} and record.flow_run_id == "fr-1"
    assert heard == ["partial-aggregation"]
    assert store.get("out.bin").metadata["round"] == "1"


def test_one_record_covers_every_output_of_a_step() -> None:
    store = MemoryObjectStore()
    refs = put_all_with_lineage(
        store,
        [Output("g.bin", b"g", kind="model"), Output.json("s.json", {"b": 1, "a": 2}, kind="x")],
        Provenance(kind="global-aggregation", inputs=[], parameters={}, started_at=NOW),
    )
    assert store.get("s.json").data == b'{"a":2,"b":1}'
    for key in ("g.bin", "s.json"):
        record = read_lineage(store, key)
        assert record is not None and [o.sha256 for o in record.outputs] == [r.sha256 for r in refs]
    with pytest.raises(ValueError, match="at least one output"):
        put_all_with_lineage(
            store, [], Provenance(kind="evaluation", inputs=[], parameters={}, started_at=NOW)
        )
