"""End to end: devices enrol at a real gateway (HTTP, moto S3) and the flow's reader
sees them through the index's shards, without listing a single device record."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from edge.registry_index import IndexShard, RegistryIndex, merge_shards
from infra.keys import registry_index_prefix, registry_prefix
from infra.store import S3ObjectStore, StoredObject
from tasks.dispatch import read_registry
from tests.edge.devices import JOB, Device


class CountingS3(S3ObjectStore):
    """The real S3 store, counting the LISTs (by prefix) and GETs a registry read sends."""

    def __init__(self, store: S3ObjectStore) -> None:
        super().__init__(store.settings)
        self.lists: list[str] = []
        self.gets = 0

    def list_keys(self, prefix: str) -> list[str]:
        self.lists.append(prefix)
        return super().list_keys(prefix)

    def get(self, key: str, *, expected_sha256: str | None = None) -> StoredObject:
        self.gets += 1
        return super().get(key, expected_sha256=expected_sha256)


def enrol_all(client: httpx.Client, ids: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda d: Device(client, d).enrol(), ids))
    assert [a.status_code for a in answers] == [200] * len(ids), answers[0].text


def test_enrolled_devices_reach_the_flow_through_shards_only(
    client: httpx.Client, s3_store: S3ObjectStore
) -> None:
    # Prepare: 40 devices enrol at once, then 5 more, then one enrols again
    first = [f"phone-{i:02d}" for i in range(40)]
    enrol_all(client, first)
    reader, index = CountingS3(s3_store), RegistryIndex(JOB)

    # Execute / Assert: the first read takes every shard, with one LIST of the index
    seen = read_registry(reader, JOB, index)
    shards = len(index.shards)
    assert seen.source == "index" and seen.ids == sorted(first)
    assert 1 <= shards < len(first)  # group commit: several ids per shard
    assert (reader.lists, reader.gets) == ([registry_index_prefix(JOB)], shards)

    later = [f"phone-{i:02d}" for i in range(40, 45)]
    enrol_all(client, later)
    assert Device(client, "phone-00").enrol().status_code == 200  # enrols again
    grown = read_registry(reader, JOB, index)
    assert grown.ids == sorted(first + later)
    assert reader.gets == len(index.shards) == shards + grown.new_shards  # only new ones
    assert set(reader.lists) == {registry_index_prefix(JOB)}

    # every indexed id has its device record (the source of truth for its details)
    records = s3_store.list_keys(registry_prefix(JOB))
    assert {f"{registry_prefix(JOB)}{d}.json" for d in grown.ids} <= set(records)
    stored = [IndexShard.model_validate_json(s3_store.get(k).data) for k in sorted(index.shards)]
    assert merge_shards(stored) == set(grown.ids)
    assert len({s.writer for s in stored}) == 1  # one gateway process, one writer name
