"""Group commit: accepted updates of one leaf written as one S3 object.

Each accepted update joins the open batch of its (job, run, round, leaf, kind:
training updates and evaluation results never share a batch). The
batch is written when it is full (``max_updates``), or ``idle_wait`` seconds
after its last update joined if no other upload of its leaf is arriving then
(``expect``: admitted at the door, body still being read or checked), or
``max_wait`` seconds after its first update arrived, whichever comes first;
but while the leaf's previous batch is still being committed (written, then
fenced), a batch that is not full waits for that commit to end
(``batch_policy.flush_decision``).
Batches therefore grow by themselves when storage is slow (classic group
commit): the number of PUTs follows what S3 can absorb, not the number of
devices. Every device waiting on
the batch is acknowledged only when the PUT has returned, so an acknowledged
update is in S3 even if the gateway is killed the next instant. If the PUT
fails every waiter gets a 503 and retries; nothing half-written is acknowledged.

**The close fence.** After the PUT has returned, and before anyone is
acknowledged, the committer calls ``fence(context)``: the gateway re-reads the
job's ``ActiveRound`` from S3, uncached, and acknowledges the batch only if
that round of that run is still open. Otherwise every device of the batch gets
``409 late`` (``details.reason = "round_closed_during_write"``). Because S3 is
linearisable per key and lists are strongly consistent, a flow that writes
``closed`` and *then* lists the round's updates sees every acknowledged batch,
with no grace period to tune (the argument is in docs/gateway.md).

The lineage record of a batch is written after the acknowledgements: it
describes the batch but is not needed to aggregate it, so devices do not wait
for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from edge.gateway.batch_policy import Flush, flush_decision
from edge.gateway.metrics import GatewayMetrics
from edge.protocol import ErrorCode, ProtocolError
from edge.update_batch import (
    KIND_UPDATE_BATCH,
    BatchContext,
    DeviceUpdate,
    batch_key,
    encode_update_batch,
)
from infra.keys import batch_name
from infra.lineage import make_record, write_lineage
from infra.store import ObjectRef, ObjectStore

log = logging.getLogger("canopy.gateway.batcher")

Fence = Callable[[BatchContext], Awaitable[None]]
"""Raises a ``ProtocolError`` (409 late, or 503) when a written batch must not be acknowledged."""


def _store_failed() -> ProtocolError:
    return ProtocolError(
        503,
        ErrorCode.STORE_UNAVAILABLE,
        "the gateway could not store the update; upload it again",
        retry_after=2.0,
    )


@dataclass
class _OpenBatch:
    context: BatchContext
    global_model: ObjectRef
    opened: float
    items: list[tuple[DeviceUpdate, asyncio.Future[str]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    idle_timer: asyncio.TimerHandle | None = None
    expired: bool = False  # max_wait has passed since the first update arrived
    idle: bool = False  # idle_wait has passed since the last update joined


class Arrival:
    """An upload admitted for a leaf whose update has not joined a batch yet.

    While it is open the leaf's batch may linger for it (up to ``max_wait``);
    ``close`` (joined, or turned away) lets the batch go. Closing twice is harmless.
    """

    def __init__(self, committer: GroupCommitter, context: BatchContext) -> None:
        self._committer = committer
        self.context = context
        self.open = True

    def close(self, *, consider: bool = True) -> None:
        if self.open:
            self.open = False
            self._committer._arrived(self.context, consider=consider)

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GroupCommitter:
    """Collects accepted updates per leaf and writes each batch as one object."""

    def __init__(
        self,
        store: ObjectStore,
        executor: Executor,
        metrics: GatewayMetrics,
        *,
        gateway_id: str,
        max_updates: int,
        max_wait_seconds: float,
        idle_wait_seconds: float = 0.0,
        fence: Fence | None = None,
    ) -> None:
        self._store = store
        self._fence = fence
        self._executor = executor
        self._metrics = metrics
        self._gateway_id = gateway_id
        self._max_updates = max_updates
        self._max_wait = max_wait_seconds
        self._idle_wait = min(idle_wait_seconds, max_wait_seconds)
        self._open: dict[BatchContext, _OpenBatch] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._committing: Counter[BatchContext] = Counter()  # PUT + fence in flight per leaf
        self._arriving: Counter[BatchContext] = Counter()  # admitted, not in a batch yet
        self._seq = itertools.count()
        self.pending = 0

    def expect(self, context: BatchContext) -> Arrival:
        """Say that an upload for ``context``'s leaf is on its way (see ``Arrival``)."""
        self._arriving[context] += 1
        return Arrival(self, context)

    def _arrived(self, context: BatchContext, *, consider: bool) -> None:
        self._arriving[context] -= 1
        if self._arriving[context] <= 0:
            del self._arriving[context]
        if consider:
            self._consider(context)

    async def commit(
        self,
        context: BatchContext,
        global_model: ObjectRef,
        update: DeviceUpdate,
        arrival: Arrival | None = None,
    ) -> str:
        """Add ``update`` to its leaf's batch; return the batch key once it is in S3.

        ``arrival``: the ``expect`` this update fulfils, closed as the update joins.
        """
        loop = asyncio.get_running_loop()
        batch = self._open.get(context)
        if batch is None:
            batch = _OpenBatch(context, global_model, time.perf_counter())
            batch.timer = loop.call_later(self._max_wait, self._timer_fired, context)
            self._open[context] = batch
        # The quiet period restarts with every update: a burst keeps its batch open
        # (up to max_wait), a lone update waits idle_wait only.
        if batch.idle_timer is not None:
            batch.idle_timer.cancel()
        batch.idle = self._idle_wait <= 0
        if not batch.idle:
            batch.idle_timer = loop.call_later(self._idle_wait, self._idle_fired, context)
        future: asyncio.Future[str] = loop.create_future()
        batch.items.append((update, future))
        self.pending += 1
        self._metrics.pending_updates.inc()
        if arrival is not None:
            arrival.close(consider=False)  # considered just below, with the update in
        self._consider(context)
        # shield: a device hanging up must not cancel the shared write's future.
        return await asyncio.shield(future)

    def _timer_fired(self, context: BatchContext) -> None:
        batch = self._open.get(context)
        if batch is not None:
            batch.expired = True
            self._consider(context)

    def _idle_fired(self, context: BatchContext) -> None:
        batch = self._open.get(context)
        if batch is not None:
            batch.idle = True
            self._consider(context)

    def _consider(self, context: BatchContext) -> None:
        """Write the leaf's open batch if the group-commit rule says so now."""
        batch = self._open.get(context)
        if batch is None:
            return
        decision = flush_decision(
            size=len(batch.items),
            expired=batch.expired,
            committing=self._committing[context] > 0,
            arriving=self._arriving[context],
            max_updates=self._max_updates,
            idle=batch.idle,
        )
        if decision is Flush.WRITE:
            self._flush(context)

    def _flush(self, context: BatchContext) -> None:
        batch = self._open.pop(context, None)
        if batch is None:
            return
        for timer in (batch.timer, batch.idle_timer):
            if timer is not None:
                timer.cancel()
        self._committing[context] += 1
        task = asyncio.ensure_future(self._write(batch))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, batch: _OpenBatch) -> None:
        """Commit the batch (PUT, fence, answers), then write its lineage record."""
        started_at = datetime.now(UTC)
        try:
            ref = await self._commit(batch)
        finally:
            self._commit_ended(batch.context)
        if ref is not None:
            await self._write_lineage(batch, ref, started_at)

    async def _commit(self, batch: _OpenBatch) -> ObjectRef | None:
        """Encode and PUT in one thread hop, read the fence, answer every device.

        Returns the stored object, or None when the PUT failed (everyone got a 503).
        """
        loop = asyncio.get_running_loop()
        ctx = batch.context
        updates = [update for update, _ in batch.items]
        batch_id = batch_name(
            self._gateway_id, time.time_ns() // 1_000_000, next(self._seq), len(updates)
        )
        key = batch_key(ctx, batch_id)
        started = time.perf_counter()
        try:
            put = self._encode_and_put
            ref = await loop.run_in_executor(self._executor, put, key, updates, ctx)
        except Exception as exc:  # any store failure (boto, network) must become a 503, not a crash
            log.error("batch %s: write of %d updates failed: %s", key, len(updates), exc)
            self._metrics.batch_failures.inc()
            self._settle(batch, error=_store_failed)
            return None
        self._metrics.batch_writes.inc()
        self._metrics.batch_size.observe(len(updates))
        self._metrics.batch_write_seconds.observe(time.perf_counter() - started)
        refusal = await self._fenced(ctx, key, len(updates))
        self._settle(batch, key=key, error=refusal)
        return ref

    async def _fenced(
        self, ctx: BatchContext, key: str, count: int
    ) -> Callable[[], ProtocolError] | None:
        """None when the batch may be acknowledged; else what each of its devices is told."""
        if self._fence is None:
            return None
        try:
            await self._fence(ctx)
        except ProtocolError as exc:
            if exc.status == 409:
                log.warning("batch %s: round closed during the write; %d not acked", key, count)
                self._metrics.batch_fenced.inc()
                self._metrics.late_results.labels(job=ctx.job).inc(count)
            refusal = exc
        except Exception as exc:  # the fence could not be read: nobody may be acknowledged
            log.error("batch %s: close fence not readable: %s", key, exc)
            refusal = _store_failed()
        else:
            return None
        return lambda: ProtocolError(
            refusal.status,
            refusal.code,
            refusal.message,
            details=refusal.details,
            retry_after=refusal.retry_after,
        )

    def _commit_ended(self, context: BatchContext) -> None:
        self._committing[context] -= 1
        if self._committing[context] <= 0:
            del self._committing[context]
        self._consider(context)

    def _encode_and_put(
        self, key: str, updates: list[DeviceUpdate], context: BatchContext
    ) -> ObjectRef:
        return self._put(key, encode_update_batch(updates, context), len(updates))

    def _put(self, key: str, data: bytes, count: int) -> ObjectRef:
        return self._store.put_bytes(
            key,
            data,
            kind=KIND_UPDATE_BATCH,
            metadata={"gateway-id": self._gateway_id, "updates": str(count)},
        )

    def _settle(
        self,
        batch: _OpenBatch,
        *,
        key: str = "",
        error: Callable[[], ProtocolError] | None = None,
    ) -> None:
        """Acknowledge every waiting device, or give each its own copy of the refusal."""
        for _, future in batch.items:
            self.pending -= 1
            self._metrics.pending_updates.dec()
            if future.done():
                continue
            if error is None:
                future.set_result(key)
            else:
                future.set_exception(error())

    async def _write_lineage(self, batch: _OpenBatch, ref: ObjectRef, started: datetime) -> None:
        ctx = batch.context
        updates = [update for update, _ in batch.items]
        record = make_record(
            kind="device-update-batch" if ctx.kind == "train" else "device-evaluation-batch",
            inputs=[batch.global_model],
            outputs=[ref],
            parameters={
                "job": ctx.job,
                "run_id": ctx.run_id,
                "round": ctx.round,
                "leaf": ctx.leaf,
                "gateway_id": ctx.gateway_id,
                "task_kind": ctx.kind,
                "device_ids": [u.device_id for u in updates],
                "num_samples": [u.num_samples for u in updates],
                "num_updates": len(updates),
                "total_samples": sum(u.num_samples for u in updates),
            },
            started_at=started,
        )
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, write_lineage, self._store, record)
        except Exception as exc:  # lineage is best effort; the batch is already safe
            log.warning("batch %s: lineage record not written: %s", ref.key, exc)

    async def drain(self) -> None:
        """Write every open batch now and wait for all writes (graceful shutdown)."""
        for context in list(self._open):
            self._flush(context)
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
