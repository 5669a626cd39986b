"""A gateway reads each leaf's task manifest once per opening of a round (docs/scale.md).

With a short TTL, G gateways x L leaves re-read every manifest every half
second for as long as polls arrive: 2,437 of a 10,000-device round's S3
requests. A manifest never changes for one opening, so it is kept for the
opening's life; a redone round (a new opening) is read afresh.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edge.gateway.rounds import RoundDirectory, StoreCalls
from edge.gateway.tuning import GatewayTuning
from infra.keys import active_job_key
from infra.store import MemoryObjectStore, StoredObject
from tests.support.harness import write_round

JOB, RUN = "hello-mobile", "r"
STATE = {"w": np.zeros(2, dtype=np.float32)}


class CountingStore(MemoryObjectStore):
    """Counts GETs per key."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: dict[str, int] = {}

    def get(self, key: str, *, expected_sha256: str | None = None) -> StoredObject:
        self.gets[key] = self.gets.get(key, 0) + 1
        return super().get(key, expected_sha256=expected_sha256)


def manifest_gets(store: CountingStore) -> int:
    return sum(n for key, n in store.gets.items() if "/tasks/" in key)


def test_a_leaf_manifest_is_read_once_per_opening_of_a_round() -> None:
    # Prepare: an open round on two leaves; the ActiveRound is cached for no time at all
    store = CountingStore()
    write_round(store, job=JOB, run_id=RUN, rnd=0, leaves=["a", "b"], selected=["d1"], state=STATE)
    directory = RoundDirectory(
        StoreCalls(store, ThreadPoolExecutor(2)), manifest_ttl=0.0, tuning=GatewayTuning()
    )

    async def selected_in_every_leaf(times: int) -> set[str]:
        selected: set[str] = set()
        for _ in range(times):
            active = await directory.active_round(JOB)
            assert active is not None
            for leaf in active.leaves:
                selected |= (await directory.leaf_view(active, leaf)).selected
        return selected

    # Execute: many polls' worth of lookups of the same opening
    first = asyncio.run(selected_in_every_leaf(20))

    # Assert: the pointer is re-read every time, each manifest once
    assert manifest_gets(store) == 2
    assert store.gets[active_job_key(JOB)] == 20

    # Execute: the round is redone (a new opening writes its manifests and pointer again)
    write_round(store, job=JOB, run_id=RUN, rnd=0, leaves=["a", "b"], selected=["d2"], state=STATE)
    second = asyncio.run(selected_in_every_leaf(5))

    # Assert: the new opening's manifests were read (once each), and they are the new tasks
    assert manifest_gets(store) == 4
    assert (first, second) == ({"d1"}, {"d2"})


def test_reading_a_leafs_task_loads_its_model_before_any_device_asks() -> None:
    # Prepare: an open round; nobody has downloaded its model yet
    store = CountingStore()
    tasks = write_round(
        store, job=JOB, run_id=RUN, rnd=0, leaves=["a"], selected=["d1"], state=STATE
    )
    model = tasks["a"].global_model
    directory = RoundDirectory(
        StoreCalls(store, ThreadPoolExecutor(2)), manifest_ttl=0.0, tuning=GatewayTuning()
    )

    async def offer_then_download() -> tuple[int, bytes]:
        active = await directory.active_round(JOB)
        assert active is not None
        await directory.leaf_view(active, "a")  # what a poll reads to make its offer
        while directory.prefetching:  # the bytes arrive in the background
            await asyncio.sleep(0.01)
        fetched_before_download = store.gets.get(model.key, 0)
        return fetched_before_download, await directory.artifact(model)

    # Execute
    before, data = asyncio.run(offer_then_download())

    # Assert: loaded (and verified) once, before the download, which then read no more
    assert before == 1 and store.gets[model.key] == 1
    assert data == store.get(model.key).data
