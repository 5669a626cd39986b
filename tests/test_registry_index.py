"""The registry index's pure parts and the flow-side reader, without a gateway.

Shards (``edge.registry_index``) are validated and merged as plain data; the
gateway's group commit (``edge.gateway.registry_index.IndexWriter``) and the
flow's reader (``tasks.dispatch.read_registry``) run against the in-memory
store here, and end to end over HTTP and moto in tests/edge/test_gw_registry_index.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pydantic
import pytest

from aggregation.cohort import select_cohort
from edge.gateway.registry_index import IndexWriter
from edge.gateway.rounds import StoreCalls
from edge.manifests import KIND_DEVICE_RECORD
from edge.protocol import ProtocolError
from edge.registry_index import (
    KIND_REGISTRY_SHARD,
    IndexShard,
    RegistryIndex,
    is_shard_key,
    merge_shards,
    record_ids,
    writer_id,
)
from infra.errors import StoreError
from infra.keys import device_key, registry_prefix, registry_shard_key
from infra.store import MemoryObjectStore, ObjectRef, put_json
from tasks.dispatch import RegistryView, devices_of, read_registry
from tasks.run_cache import run_cache

JOB = "hello-mobile"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def shard(seq: int, ids: list[str], job: str = JOB, writer: str = "gw-0-1-abc") -> IndexShard:
    return IndexShard(job=job, writer=writer, seq=seq, written_at=NOW, device_ids=tuple(ids))


def put_shard(store: MemoryObjectStore, s: IndexShard) -> str:
    key = registry_shard_key(s.job, s.writer, s.seq, len(s.device_ids))
    put_json(store, key, s, kind=KIND_REGISTRY_SHARD)
    return key


def put_record(store: MemoryObjectStore, device_id: str) -> None:
    """A device record as any gateway, old or new, writes it (its body is not read here)."""
    put_json(store, device_key(JOB, device_id), {"device_id": device_id}, kind=KIND_DEVICE_RECORD)


class CountingStore(MemoryObjectStore):
    """The in-memory store, counting LISTs by prefix and GETs: what a registry read costs."""

    def __init__(self) -> None:
        super().__init__()
        self.lists: list[str] = []
        self.gets = 0

    def list_keys(self, prefix: str) -> list[str]:
        self.lists.append(prefix)
        return super().list_keys(prefix)

    def get(self, key: str, *, expected_sha256: str | None = None):  # type: ignore[no-untyped-def]
        self.gets += 1
        return super().get(key, expected_sha256=expected_sha256)


# ---------------------------------------------------------------- the shard model


def test_a_shard_holds_valid_ids_of_one_job_and_refuses_anything_else() -> None:
    good = shard(0, ["phone-1", "phone-2"])
    assert IndexShard.model_validate_json(good.model_dump_json()) == good
    for bad in (
        {"device_ids": ()},  # empty
        {"device_ids": ("../escape",)},
        {"device_ids": ("a/b",)},
        {"job": "a/b"},
        {"seq": -1},
        {"format": 2},
        {"extra": "field"},
    ):
        with pytest.raises(pydantic.ValidationError):
            IndexShard.model_validate({**good.model_dump(), **bad})


def test_shard_keys_sit_under_the_index_prefix_and_never_collide_with_a_record() -> None:
    key = registry_shard_key(JOB, "gw-0-1700000000000-a1b2c3", 7, 42)
    assert key == "devices/hello-mobile/index/gw-0-1700000000000-a1b2c3-000007-n42.json"
    assert is_shard_key(JOB, key)
    assert not is_shard_key(JOB, device_key(JOB, "index"))  # a device named "index" is a record
    assert not is_shard_key("other", key)
    with pytest.raises(ValueError, match="at least one id"):
        registry_shard_key(JOB, "w", 0, 0)


def test_writer_names_differ_per_process_even_for_one_gateway_id_and_millisecond() -> None:
    a, b = writer_id("gw-0", 1700, "a1b2c3"), writer_id("gw-0", 1700, "d4e5f6")
    assert a != b
    with pytest.raises(ValueError):
        writer_id("gw/0", 1700, "a1b2c3")


def test_record_ids_skips_the_index_and_anything_that_is_not_a_record() -> None:
    prefix = registry_prefix(JOB)
    keys = [
        f"{prefix}phone-1.json",
        f"{prefix}index/gw-0-1-abc-000000-n3.json",
        f"{prefix}index.json",  # a device whose id is "index"
        f"{prefix}phone-2.txt",
        "devices/other/phone-9.json",
    ]
    assert record_ids(prefix, keys) == ["phone-1", "index"]


def test_merging_is_a_union_whatever_the_order_and_however_often_an_id_enrols() -> None:
    shards = [shard(0, ["a", "b"]), shard(1, ["b", "c"]), shard(0, ["a"], writer="gw-1-2-def")]
    assert merge_shards(shards) == {"a", "b", "c"}
    assert merge_shards(reversed(shards)) == merge_shards(shards)
    assert merge_shards([]) == frozenset()


def test_the_index_reads_each_shard_once_and_refuses_another_jobs() -> None:
    index = RegistryIndex(JOB)
    k0 = registry_shard_key(JOB, "w", 0, 2)
    k1 = registry_shard_key(JOB, "w", 1, 1)
    assert index.unseen([k1, k0, "devices/hello-mobile/phone-1.json"]) == [k0, k1]
    index.add(k0, shard(0, ["b", "a"]))
    assert index.unseen([k0, k1]) == [k1]
    assert index.sorted_ids() == ["a", "b"]
    with pytest.raises(ValueError, match="not 'hello-mobile'"):
        index.add("x", shard(0, ["z"], job="other"))


def test_the_same_ids_give_the_same_cohort_from_the_index_as_from_the_records() -> None:
    ids = [f"phone-{i}" for i in range(200)]
    from_index = merge_shards([shard(i, ids[i::7]) for i in range(7)])
    prefix = registry_prefix(JOB)
    from_records = record_ids(prefix, [device_key(JOB, d) for d in reversed(ids)])
    draw = {"cohort_size": 30, "over_selection": 1.3, "seed": 4, "rnd": 2}
    assert select_cohort(from_index, **draw) == select_cohort(from_records, **draw)


# ---------------------------------------------------------------- the gateway's group commit


def run_adds(
    store: MemoryObjectStore, ids: list[str], **writer: float
) -> list[BaseException | None]:
    """Enrol ``ids`` at once through one IndexWriter; each add's outcome."""

    async def main() -> list[BaseException | None]:
        with ThreadPoolExecutor(2) as pool:
            index = IndexWriter(StoreCalls(store, pool), gateway_id="gw-0", **writer)  # type: ignore[arg-type]
            got = await asyncio.gather(*(index.add(JOB, d) for d in ids), return_exceptions=True)
            await index.drain()
        return [g if isinstance(g, BaseException) else None for g in got]

    return asyncio.run(main())


def shards_in(store: MemoryObjectStore) -> Mapping[str, IndexShard]:
    keys = store.list_keys(f"{registry_prefix(JOB)}index/")
    return {k: IndexShard.model_validate_json(store.get(k).data) for k in keys}


def test_enrolments_within_the_window_share_one_shard() -> None:
    store = MemoryObjectStore()
    ids = [f"phone-{i}" for i in range(50)]
    assert run_adds(store, ids) == [None] * 50
    (only,) = shards_in(store).values()
    assert sorted(only.device_ids) == sorted(ids)


def test_a_full_shard_is_written_at_once_and_the_rest_follow() -> None:
    store = MemoryObjectStore()
    ids = [f"phone-{i}" for i in range(25)]
    assert run_adds(store, ids, max_ids=10, max_wait_s=5.0) == [None] * 25
    found = shards_in(store)
    assert [len(s.device_ids) for s in found.values()] == [10, 10, 5]
    assert [s.seq for s in found.values()] == [0, 1, 2]
    assert merge_shards(found.values()) == set(ids)


class RefusingStore(MemoryObjectStore):
    """S3 refusing every PUT, as an outage would."""

    def put_bytes(self, key: str, data: bytes, *, kind: str, metadata=None) -> ObjectRef:  # type: ignore[no-untyped-def]
        raise StoreError(f"put {key} failed: simulated outage")


def test_a_shard_that_cannot_be_stored_fails_every_enrolment_in_it_with_a_503() -> None:
    outcomes = run_adds(RefusingStore(), ["phone-1", "phone-2"])
    assert all(isinstance(o, ProtocolError) and o.status == 503 for o in outcomes), outcomes


# ---------------------------------------------------------------- the flow's reader


def test_a_round_reads_only_new_shards_and_never_lists_the_records() -> None:
    store = CountingStore()
    for i in range(40):
        put_record(store, f"phone-{i}")
    put_shard(store, shard(0, [f"phone-{i}" for i in range(30)]))
    index = RegistryIndex(JOB)

    first = read_registry(store, JOB, index)
    assert (first.source, len(first.ids), first.new_shards, store.gets) == ("index", 30, 1, 1)

    again = read_registry(store, JOB, index)  # nothing new: one LIST, no GET
    assert (again.ids, again.new_shards, store.gets) == (first.ids, 0, 1)

    put_shard(store, shard(1, [f"phone-{i}" for i in range(30, 40)]))
    grown = read_registry(store, JOB, index)
    assert (len(grown.ids), grown.new_shards, store.gets) == (40, 1, 2)
    assert set(store.lists) == {f"{registry_prefix(JOB)}index/"}  # never the records


def test_a_registry_without_an_index_is_listed_as_before() -> None:
    store = CountingStore()
    for i in range(12):
        put_record(store, f"phone-{i}")
    read = read_registry(store, JOB, RegistryIndex(JOB))
    assert read.source == "records"
    assert read.ids == sorted(f"phone-{i}" for i in range(12))
    assert store.gets == 0  # keys only


def test_an_unreadable_shard_is_skipped_and_read_once_it_is_whole() -> None:
    store = MemoryObjectStore()
    good = put_shard(store, shard(0, ["a", "b"]))
    bad = registry_shard_key(JOB, "gw-0-1-abc", 1, 1)
    store.put_bytes(bad, b"{not json", kind=KIND_REGISTRY_SHARD)
    index = RegistryIndex(JOB)
    assert read_registry(store, JOB, index).ids == ["a", "b"]
    assert index.shards == {good}
    put_json(store, bad, shard(1, ["c"]), kind=KIND_REGISTRY_SHARD)
    assert read_registry(store, JOB, index).ids == ["a", "b", "c"]


def test_open_round_gets_the_ids_a_view_refers_to_from_the_run_cache() -> None:
    store = MemoryObjectStore()
    put_shard(store, shard(0, ["a", "b", "c"]))
    read = read_registry(store, JOB, RegistryIndex(JOB))
    view = read.view(JOB)
    assert isinstance(view, RegistryView) and view.devices == 3
    assert len(view.model_dump_json()) < 300  # what Prefect records, whatever the fleet
    with run_cache() as cache:
        cache.keep_snapshot(view.digest, ["a", "b", "c"])
        put_shard(store, shard(1, ["d"]))  # enrolled after the wait: not in this round
        assert devices_of(store, view) == ["a", "b", "c"]
    # outside the run (no snapshot) the registry is read again
    assert devices_of(store, view) == ["a", "b", "c", "d"]
    assert devices_of(store, ["x", "y"]) == ["x", "y"]
