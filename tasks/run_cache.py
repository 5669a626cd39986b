"""What a flow run loads once and keeps until it ends: templates, datasets, weight caps,
the device registry's index.

A run exports its ExecuTorch program once and patches each round's weights into
that template, and evaluates every round on the same held-out data; reloading
either per round would cost seconds. The registry's index is read shard by
shard as gateways add them (``tasks.dispatch.read_registry``), so a round reads
only the shards enrolled since the last one, and the ids of what a round saw
stay here under their digest instead of travelling through Prefect.
``run_cache()`` gives these objects an explicit lifetime, the
``federated-training`` flow run that opens it, instead of module globals that
outlive runs in a long-lived runner process. Tasks reach the
open cache through a context variable (Prefect runs a flow's async tasks and
subflows in copies of its context); outside a run they get a fresh, empty one,
so a task called on its own still works, only uncached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the template module loads ExecuTorch, which PyTorch runs never need
    from edge.data.dataset import Dataset
    from edge.jobs import JobSpec
    from edge.registry_index import RegistryIndex
    from edge.training.template import ProgramTemplate
    from tasks.deferred import DeferredWrites


@dataclass
class RunCache:
    """Loaded program templates (by key and sha256) and datasets (by job and config)."""

    templates: dict[tuple[str, str], ProgramTemplate] = field(default_factory=dict)
    datasets: dict[tuple[str, str], Dataset] = field(default_factory=dict)
    weight_caps: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, JobSpec] = field(default_factory=dict)
    registries: dict[str, RegistryIndex] = field(default_factory=dict)
    snapshots: dict[str, list[str]] = field(default_factory=dict)
    closes: dict[tuple[str, str, int, str], asyncio.Event] = field(default_factory=dict)
    writes: DeferredWrites | None = None

    def deferred_writes(self) -> DeferredWrites:
        """The run's writer of deferred lineage records (``tasks.deferred``)."""
        if self.writes is None:
            from tasks.deferred import DeferredWrites

            self.writes = DeferredWrites()
        return self.writes

    def template(
        self, key: str, sha256: str, load: Callable[[], ProgramTemplate]
    ) -> ProgramTemplate:
        if (key, sha256) not in self.templates:
            self.templates[(key, sha256)] = load()
        return self.templates[(key, sha256)]

    def dataset(self, job: str, config_json: str, load: Callable[[], Dataset]) -> Dataset:
        if (job, config_json) not in self.datasets:
            self.datasets[(job, config_json)] = load()
        return self.datasets[(job, config_json)]

    def job(self, reference: str, load: Callable[[], JobSpec]) -> JobSpec:
        """A job resolved once per run: a user's file is imported once, not per key."""
        if reference not in self.jobs:
            self.jobs[reference] = load()
        return self.jobs[reference]

    def registry(self, job: str, create: Callable[[], RegistryIndex]) -> RegistryIndex:
        """The job's registry index as read so far in this run (shards read, their ids)."""
        if job not in self.registries:
            self.registries[job] = create()
        return self.registries[job]

    def keep_snapshot(self, digest: str, ids: list[str]) -> None:
        """Keep the ids a registry read returned, by their digest (the last few only)."""
        self.snapshots[digest] = ids
        while len(self.snapshots) > 4:
            del self.snapshots[next(iter(self.snapshots))]

    def close_event(self, job: str, run_id: str, rnd: int, kind: str) -> asyncio.Event:
        """Set when this process closed the round (``tasks.close_signal``); the last few."""
        key = (job, run_id, rnd, kind)
        if key not in self.closes:
            self.closes[key] = asyncio.Event()
            while len(self.closes) > 8:
                del self.closes[next(iter(self.closes))]
        return self.closes[key]

    def weight_cap(self, partition_json: str, compute: Callable[[], int]) -> int:
        if partition_json not in self.weight_caps:
            self.weight_caps[partition_json] = compute()
        return self.weight_caps[partition_json]


_CURRENT: ContextVar[RunCache | None] = ContextVar("canopy_run_cache", default=None)


@contextmanager
def run_cache() -> Iterator[RunCache]:
    """Open a cache for the duration of one flow run; it is dropped when the block ends."""
    cache = RunCache()
    token = _CURRENT.set(cache)
    try:
        yield cache
    finally:
        _CURRENT.reset(token)
        if cache.writes is not None:  # records of rounds that never committed: still written
            cache.writes.close()


def open_cache() -> RunCache | None:
    """The open run's cache, or None outside a run."""
    return _CURRENT.get()


def current_cache() -> RunCache:
    """The open run's cache, or a throwaway one outside a run."""
    return _CURRENT.get() or RunCache()
