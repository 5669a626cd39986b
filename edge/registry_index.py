"""The device registry's index: append-only shards of enrolled ids, and their union.

Why: the registry's source of truth is one record per device and job
(``devices/{job}/{device_id}.json``, what the device told the gateway at
enrolment). Picking a round's cohort only needs the ids, and listing a
million records each round costs a thousand LIST pages. So each gateway process
also group-commits the ids it enrolled into shards
(``devices/{job}/index/{writer}-{seq}-n{count}.json``, several ids per object,
``writer`` unique per process so no two processes ever write the same key);
the flow keeps the union in memory for the run and each round reads only the
shards it has not seen: one LIST page per thousand shards plus one GET per new
shard, O(shards) and not O(devices).

Shards are only ever added. A device that enrols again (its token expired, or
it enrolled at another gateway) appears in a later shard too; the union does
not care. A registry that has device records but no shard at all was written
by gateways older than the index, and readers fall back to listing the records
(``record_ids``).

Everything here is pure (no I/O): the gateway's writer is
``edge.gateway.registry_index``, the flow's reader ``tasks.dispatch``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from infra.keys import check_segment, registry_index_prefix

KIND_REGISTRY_SHARD = "registry-index-shard"
# Most ids one shard holds: ~40 bytes each, so a full shard is a ~200 KB GET.
MAX_SHARD_IDS = 5000


class IndexShard(BaseModel):
    """Ids one gateway process enrolled for ``job`` in one group commit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1
    job: str
    writer: str = Field(description="The gateway process that wrote it (unique per process).")
    seq: int = Field(ge=0, description="This writer's shard number for the job, from 0.")
    written_at: datetime
    device_ids: tuple[str, ...] = Field(min_length=1, max_length=MAX_SHARD_IDS)

    @field_validator("job", "writer")
    @classmethod
    def _segment(cls, value: str) -> str:
        return check_segment(value, "job or writer")

    @field_validator("device_ids")
    @classmethod
    def _ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for device_id in value:
            check_segment(device_id, "device id")
        return value


def writer_id(gateway_id: str, started_ms: int, nonce: str) -> str:
    """A name no other gateway process will use: gateway id, start time, random nonce.

    Two processes of one gateway id (workers, a restart within a millisecond) still
    differ by the nonce, so their shard keys never collide and no shard is overwritten.
    """
    return check_segment(f"{gateway_id}-{started_ms}-{nonce}", "writer")


def is_shard_key(job: str, key: str) -> bool:
    """Whether ``key`` is one of ``job``'s index shards."""
    return key.startswith(registry_index_prefix(job)) and key.endswith(".json")


def record_ids(prefix: str, keys: Iterable[str]) -> list[str]:
    """Device ids from a listing of registry records under ``prefix`` (the fallback).

    Only ``{prefix}{id}.json`` counts: the index's shards (``{prefix}index/...``)
    and anything else deeper in the folder are not devices.
    """
    out: list[str] = []
    for key in keys:
        if not key.startswith(prefix) or not key.endswith(".json"):
            continue
        name = key[len(prefix) : -len(".json")]
        if name and "/" not in name:
            out.append(name)
    return out


def merge_shards(shards: Iterable[IndexShard]) -> frozenset[str]:
    """The ids in any of ``shards``: the registry as far as they tell."""
    ids: set[str] = set()
    for shard in shards:
        ids.update(shard.device_ids)
    return frozenset(ids)


@dataclass
class RegistryIndex:
    """One job's registry as read so far: which shards were read, and their ids.

    The flow keeps one per job for the run (``tasks.run_cache``); each round it
    lists the shard keys and reads only ``unseen`` ones.
    """

    job: str
    shards: set[str] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)

    def unseen(self, keys: Sequence[str]) -> list[str]:
        """Shard keys in a listing that were not read yet (other keys are ignored)."""
        return sorted(k for k in keys if k not in self.shards and is_shard_key(self.job, k))

    def add(self, key: str, shard: IndexShard) -> None:
        """Take in one shard read from ``key``."""
        if shard.job != self.job:
            raise ValueError(
                f"index shard {key} is for job {shard.job!r}, not {self.job!r}; "
                "it is not merged into this registry"
            )
        self.shards.add(key)
        self.ids.update(shard.device_ids)

    def sorted_ids(self) -> list[str]:
        return sorted(self.ids)
