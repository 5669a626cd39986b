"""The gateway's half of the registry index: enrolled ids group-committed into shards.

Why: the flow picks each round's cohort from the registry, and listing one
record per device every round does not scale (``edge.registry_index``). So an
enrolment, after its device record is stored, also hands its id to this writer,
which collects the ids enrolled within ``max_wait_s`` (or up to ``max_ids``) per
job and PUTs them as one shard. The enrolment is answered only once its shard
is stored, as an upload is only acknowledged once its batch is: an enrolled
device is always in the index, and a failed shard PUT fails the enrolments in it
with a 503 (the devices enrol again, and land in a later shard).
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from edge.gateway.rounds import StoreCalls
from edge.registry_index import KIND_REGISTRY_SHARD, IndexShard, writer_id
from infra.keys import registry_shard_key
from infra.store import put_json

# A shard closes after this long or this many ids, whichever comes first: long
# enough that a burst of enrolments shares a few shards, short against an enrolment.
INDEX_MAX_WAIT_S = 0.25
INDEX_MAX_IDS = 2000


@dataclass
class _Open:
    """The shard being filled for one job: its ids and the future its enrolments await."""

    done: asyncio.Future[None]
    ids: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    timer: asyncio.TimerHandle | None = None


class IndexWriter:
    """Group commit of enrolled ids into index shards, one writer per gateway process."""

    def __init__(
        self,
        calls: StoreCalls,
        *,
        gateway_id: str,
        max_ids: int = INDEX_MAX_IDS,
        max_wait_s: float = INDEX_MAX_WAIT_S,
    ) -> None:
        self._calls = calls
        self.writer = writer_id(gateway_id, int(time.time() * 1000), secrets.token_hex(3))
        self._max_ids = max_ids
        self._max_wait_s = max_wait_s
        self._open: dict[str, _Open] = {}
        self._seq: dict[str, int] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self.shards_written = 0

    async def add(self, job: str, device_id: str) -> None:
        """Return once ``device_id`` is in a stored shard of ``job``'s index."""
        loop = asyncio.get_running_loop()
        shard = self._open.get(job)
        if shard is None:
            shard = _Open(done=loop.create_future())
            shard.done.add_done_callback(_retrieve)
            shard.timer = loop.call_later(self._max_wait_s, self._close, job)
            self._open[job] = shard
        shard.ids[device_id] = None
        if len(shard.ids) >= self._max_ids:
            self._close(job)
        await asyncio.shield(shard.done)  # a device that hangs up does not cancel the PUT

    async def drain(self) -> None:
        """Write every open shard now and wait for all writes (a gateway stopping)."""
        for job in list(self._open):
            self._close(job)
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def _close(self, job: str) -> None:
        shard = self._open.pop(job, None)
        if shard is None:
            return
        if shard.timer is not None:
            shard.timer.cancel()
        seq = self._seq.get(job, 0)
        self._seq[job] = seq + 1
        write = asyncio.ensure_future(self._write(job, seq, shard))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _write(self, job: str, seq: int, shard: _Open) -> None:
        ids = tuple(shard.ids)
        body = IndexShard(
            job=job, writer=self.writer, seq=seq, written_at=datetime.now(UTC), device_ids=ids
        )
        key = registry_shard_key(job, self.writer, seq, len(ids))
        try:
            await self._calls.run(
                functools.partial(put_json, self._calls.store, key, body, kind=KIND_REGISTRY_SHARD)
            )
        except BaseException as exc:  # the enrolments in it answer 503 (StoreCalls' error)
            shard.done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.shards_written += 1
        shard.done.set_result(None)


def _retrieve(done: asyncio.Future[None]) -> None:
    """Mark a failed shard's error as seen even if every enrolment in it hung up."""
    if not done.cancelled():
        done.exception()
