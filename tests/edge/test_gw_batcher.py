"""Group commit on its own: batches grow while storage is slow or uploads are still arriving;
an idle gateway writes at once; failures acknowledge nobody."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np

from edge.gateway.batcher import Fence, GroupCommitter
from edge.gateway.metrics import GatewayMetrics
from edge.protocol import ErrorCode, ProtocolError
from edge.update_batch import BatchContext, DeviceUpdate, decode_update_batch
from infra.errors import StoreError
from infra.lineage import read_lineage
from infra.store import MemoryObjectStore, ObjectRef

CTX = BatchContext(job="j", run_id="r", round=0, leaf="leaf-0", gateway_id="gw-t")
GLOBAL = ObjectRef(
    bucket="canopy", key="j/r/round-00000/global.safetensors", sha256="a" * 64, size=4
)


class SlowStore(MemoryObjectStore):
    """A store whose update-batch PUTs take ``delay`` seconds (or fail)."""

    def __init__(self, delay: float, fail: bool = False) -> None:
        super().__init__()
        self.delay = delay
        self.fail = fail

    def put_bytes(
        self, key: str, data: bytes, *, kind: str, metadata: Mapping[str, str] | None = None
    ) -> ObjectRef:
        if "/updates/" in key and not key.startswith("_lineage/"):
            time.sleep(self.delay)
            if self.fail:
                raise StoreError("s3 is down")
        return super().put_bytes(key, data, kind=kind, metadata=metadata)


def update(i: int) -> DeviceUpdate:
    return DeviceUpdate(
        device_id=f"d{i}",
        task_id="t",
        model_version="a" * 64,
        num_samples=i + 1,
        tensors={"w": np.full(3, float(i), np.float32)},
        received_at=datetime.now(UTC),
        gateway_id="gw-t",
    )


def committer(
    store: MemoryObjectStore,
    executor: ThreadPoolExecutor,
    fence: Fence | None = None,
    metrics: GatewayMetrics | None = None,
    **kw: float,
) -> GroupCommitter:
    return GroupCommitter(
        store,
        executor,
        metrics or GatewayMetrics(),
        gateway_id="gw-t",
        max_updates=int(kw.get("max_updates", 64)),
        max_wait_seconds=kw.get("max_wait", 0.01),
        idle_wait_seconds=kw.get("idle_wait", 0.0),
        fence=fence,
    )


async def commit_arrived(
    batcher: GroupCommitter, updates: Sequence[DeviceUpdate], ctx: BatchContext = CTX
) -> list[str]:
    """Commit ``updates`` that the door admitted together (all expected, then each joins)."""
    arrivals = [batcher.expect(ctx) for _ in updates]
    return list(
        await asyncio.gather(
            *(batcher.commit(ctx, GLOBAL, u, a) for u, a in zip(updates, arrivals, strict=True))
        )
    )


async def test_an_idle_gateway_writes_an_update_without_lingering() -> None:
    store = SlowStore(delay=0.0)
    with ThreadPoolExecutor(2) as executor:
        batcher = committer(store, executor, max_wait=600.0)
        # nothing else arriving, nothing in commit: no reason to wait the 600 s
        key = await asyncio.wait_for(batcher.commit(CTX, GLOBAL, update(0)), timeout=30)

    assert store.list_keys("j/r/round-00000/updates/") == [key]


async def test_a_burst_shares_a_batch_while_its_uploads_keep_coming() -> None:
    store = SlowStore(delay=0.0)
    with ThreadPoolExecutor(2) as executor:
        batcher = committer(store, executor, max_wait=600.0, idle_wait=0.3)
        joined = []
        for i in range(4):  # each within the quiet period of the one before, 0.45 s in all
            joined.append(asyncio.ensure_future(batcher.commit(CTX, GLOBAL, update(i))))
            await asyncio.sleep(0.15)
        keys = await asyncio.wait_for(asyncio.gather(*joined), timeout=30)

    assert len(set(keys)) == 1  # one PUT for the burst, long before the 600 s max_wait
    assert store.list_keys("j/r/round-00000/updates/") == [keys[0]]


async def test_a_batch_waits_for_uploads_still_arriving_and_goes_when_they_joined() -> None:
    store = SlowStore(delay=0.0)
    with ThreadPoolExecutor(2) as executor:
        batcher = committer(store, executor, max_wait=600.0)
        first, second = batcher.expect(CTX), batcher.expect(CTX)
        waiting = asyncio.ensure_future(batcher.commit(CTX, GLOBAL, update(0), first))
        await asyncio.sleep(0.1)
        written_while_one_arrives = store.list_keys("j/r/round-00000/updates/")
        key = await asyncio.wait_for(batcher.commit(CTX, GLOBAL, update(1), second), timeout=30)

    assert written_while_one_arrives == []  # the batch waited for the second upload
    assert await waiting == key
    assert [u.device_id for u in decode_update_batch(store.get(key).data, key)] == ["d0", "d1"]


async def test_an_arrival_turned_away_lets_its_batch_go() -> None:
    store = SlowStore(delay=0.0)
    with ThreadPoolExecutor(2) as executor:
        batcher = committer(store, executor, max_wait=600.0)
        joins, rejected = batcher.expect(CTX), batcher.expect(CTX)
        waiting = asyncio.ensure_future(batcher.commit(CTX, GLOBAL, update(0), joins))
        await asyncio.sleep(0.05)
        with rejected:  # its body failed a check: it leaves without joining
            pass
        key = await asyncio.wait_for(waiting, timeout=30)

    assert [u.device_id for u in decode_update_batch(store.get(key).data, key)] == ["d0"]


async def test_an_upload_still_arriving_is_waited_for_at_most_max_wait() -> None:
    store = SlowStore(delay=0.0)
    with ThreadPoolExecutor(2) as executor:
        batcher = committer(store, executor, max_wait=0.05)
        slow_body = batcher.expect(CTX)
        key = await asyncio.wait_for(batcher.commit(CTX, GLOBAL, update(0)), timeout=30)
        slow_body.close()

    assert [u.device_id for u in decode_update_batch(store.get(key).data, key)] == ["d0"]


async def test_batches_grow_while_the_previous_write_is_in_flight() -> None:
    store = SlowStore(delay=0.3)
    with ThreadPoolExecutor(4) as executor:
        batcher = committer(store, executor)
        first = asyncio.ensure_future(batcher.commit(CTX, GLOBAL, update(0)))
        await asyncio.sleep(0.05)  # the first batch (one update) is being written now
        rest = [asyncio.ensure_future(batcher.commit(CTX, GLOBAL, update(i))) for i in range(1, 21)]
        keys = await asyncio.gather(first, *rest)
        await batcher.drain()

    batches = store.list_keys("j/r/round-00000/updates/leaf-0/")
    sizes = sorted(len(decode_update_batch(store.get(k).data, k)) for k in batches)
    assert sizes == [1, 20]  # not twenty-one PUTs: the 20 waited for the first write
    assert len(set(keys[1:])) == 1 and keys[0] != keys[1]
    record = read_lineage(store, batches[0])
    assert record is not None and record.kind == "device-update-batch"
    assert record.inputs[0].sha256 == GLOBAL.sha256


async def test_full_batches_do_not_wait() -> None:
    store = SlowStore(delay=0.0)
    with ThreadPoolExecutor(4) as executor:
        batcher = committer(store, executor, max_updates=4, max_wait=10.0)
        started = time.perf_counter()
        await commit_arrived(batcher, [update(i) for i in range(8)])
        elapsed = time.perf_counter() - started

    assert elapsed < 5.0  # two full batches, written without waiting for the 10 s timer
    assert len(store.list_keys("j/r/round-00000/updates/")) == 2


async def test_a_failed_write_acknowledges_nobody() -> None:
    store = SlowStore(delay=0.0, fail=True)
    with ThreadPoolExecutor(2) as executor:
        batcher = committer(store, executor)
        results = await asyncio.gather(
            *(batcher.commit(CTX, GLOBAL, update(i)) for i in range(3)), return_exceptions=True
        )

    assert all(isinstance(r, ProtocolError) for r in results)
    assert {r.code for r in results if isinstance(r, ProtocolError)} == {
        ErrorCode.STORE_UNAVAILABLE
    }
    assert store.list_keys("j/") == [] and batcher.pending == 0


async def test_drain_writes_open_batches_at_shutdown() -> None:
    store = SlowStore(delay=0.0)
    with ThreadPoolExecutor(2) as executor:
        batcher = committer(store, executor, max_wait=60.0)
        still_arriving = batcher.expect(CTX)  # keeps the batch open for up to 60 s
        waiting = asyncio.ensure_future(batcher.commit(CTX, GLOBAL, update(0)))
        await asyncio.sleep(0.01)
        await batcher.drain()
        key = await asyncio.wait_for(waiting, timeout=5)
        still_arriving.close()

    assert key.startswith("j/r/round-00000/updates/leaf-0/gw-t-")
    [stored] = decode_update_batch(store.get(key).data, key)
    assert stored.device_id == "d0"


async def test_the_fence_is_read_after_the_put_and_decides_the_acknowledgement() -> None:
    store = SlowStore(delay=0.05)
    seen_at_fence: list[list[str]] = []
    open_rounds = {0}

    async def fence(ctx: BatchContext) -> None:
        seen_at_fence.append(store.list_keys("j/r/"))  # the batch must already be in S3
        if ctx.round not in open_rounds:
            raise ProtocolError(409, ErrorCode.LATE, "closed", details={"reason": "closed"})

    metrics = GatewayMetrics()
    with ThreadPoolExecutor(2) as executor:
        batcher = committer(store, executor, fence=fence, metrics=metrics)
        acked = await commit_arrived(batcher, [update(i) for i in range(3)])
        open_rounds.clear()  # the flow closed round 0
        arrivals = [batcher.expect(CTX) for _ in range(2)]
        refused = await asyncio.gather(
            *(batcher.commit(CTX, GLOBAL, update(3 + i), a) for i, a in enumerate(arrivals)),
            return_exceptions=True,
        )

    assert len(set(acked)) == 1 and seen_at_fence[0] == [acked[0]]
    assert len(seen_at_fence[1]) == 2  # the refused batch was written, then fenced
    assert [(r.status, r.code) for r in refused if isinstance(r, ProtocolError)] == [
        (409, ErrorCode.LATE),
        (409, ErrorCode.LATE),
    ]
    assert refused[0] is not refused[1]  # each device gets its own exception
    sample = metrics.registry.get_sample_value
    assert sample("canopy_gateway_batch_fenced_total") == 1
    assert sample("canopy_gateway_late_results_total", {"job": "j"}) == 2
    assert batcher.pending == 0


async def test_an_unreadable_fence_acknowledges_nobody() -> None:
    async def fence(ctx: BatchContext) -> None:
        raise StoreError("s3 is down for GETs")

    with ThreadPoolExecutor(2) as executor:
        batcher = committer(SlowStore(delay=0.0), executor, fence=fence)
        results = await asyncio.gather(
            *(batcher.commit(CTX, GLOBAL, update(i)) for i in range(2)), return_exceptions=True
        )

    assert [(r.status, r.code) for r in results if isinstance(r, ProtocolError)] == [
        (503, ErrorCode.STORE_UNAVAILABLE),
        (503, ErrorCode.STORE_UNAVAILABLE),
    ]


async def test_a_leafs_next_batch_waits_for_the_previous_batchs_fence() -> None:
    # Prepare: a fence that holds the first batch until released
    store = SlowStore(delay=0.0)
    released = asyncio.Event()

    async def fence(ctx: BatchContext) -> None:
        await released.wait()

    with ThreadPoolExecutor(2) as executor:
        batcher = committer(store, executor, fence=fence, max_wait=0.01)
        first = asyncio.ensure_future(batcher.commit(CTX, GLOBAL, update(0)))
        await asyncio.sleep(0.1)  # written, now waiting at the fence
        # Execute: more updates arrive, and their batch's timer runs out during the fence
        rest = [asyncio.ensure_future(batcher.commit(CTX, GLOBAL, update(i))) for i in range(1, 9)]
        await asyncio.sleep(0.1)
        in_s3_during_fence = len(store.list_keys("j/r/round-00000/updates/"))
        released.set()
        keys = await asyncio.gather(first, *rest)
        await batcher.drain()

    # Assert: one batch in commit per leaf, so the eight shared the next PUT
    assert in_s3_during_fence == 1
    batches = store.list_keys("j/r/round-00000/updates/leaf-0/")
    sizes = sorted(len(decode_update_batch(store.get(k).data, k)) for k in batches)
    assert sizes == [1, 8]
    assert len(set(keys[1:])) == 1 and keys[0] != keys[1]


async def test_other_leaves_do_not_wait_for_a_leafs_commit() -> None:
    # Prepare: leaf-0's first batch is held at the fence
    store = SlowStore(delay=0.0)
    released = asyncio.Event()
    other = BatchContext(job="j", run_id="r", round=0, leaf="leaf-1", gateway_id="gw-t")

    async def fence(ctx: BatchContext) -> None:
        if ctx.leaf == "leaf-0":
            await released.wait()

    with ThreadPoolExecutor(2) as executor:
        batcher = committer(store, executor, fence=fence, max_wait=0.01)
        held = asyncio.ensure_future(batcher.commit(CTX, GLOBAL, update(0)))
        await asyncio.sleep(0.05)
        # Execute: leaf-1's update is committed while leaf-0's batch waits at its fence
        key = await asyncio.wait_for(batcher.commit(other, GLOBAL, update(1)), timeout=5)
        released.set()
        await held

    # Assert
    assert key.startswith("j/r/round-00000/updates/leaf-1/")
