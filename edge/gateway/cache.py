"""Small asyncio caches that keep a gateway from hammering S3.

Thousands of devices poll the same manifest. ``TtlCache`` keeps each value for
a short time and, more importantly, lets concurrent misses share one load
("single flight"), so a burst of 5,000 polls costs one S3 GET, not 5,000.
``BytesCache`` holds model artifacts by sha256 (content-addressed, so entries
never go stale) within a byte budget. ``FreshReads`` is the opposite of a
cache: every caller gets a value loaded by a read that *started after it
asked*, but callers who ask while one read is running share the next one, so a
burst of callers costs at most two loads in a row, not one each.

Loads run as their own tasks and callers await them through ``asyncio.shield``:
a device that hangs up mid-request cancels only its own wait, never the load
other devices are waiting for.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _SingleFlight(Generic[K, V]):
    """At most one running load per key; a failed load is forgotten, not cached."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[V]] = {}

    async def run(self, key: K, loader: Callable[[], Awaitable[V]], done: Callable[[V], None]) -> V:
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(key, loader, done))
            # Retrieve the outcome even if every waiter hung up, so nothing is logged as lost.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._running[key] = task
        return await asyncio.shield(task)

    async def _load(
        self, key: K, loader: Callable[[], Awaitable[V]], done: Callable[[V], None]
    ) -> V:
        try:
            value = await loader()
            done(value)
            return value
        finally:
            self._running.pop(key, None)


class TtlCache(Generic[K, V]):
    """Values kept ``ttl(value)`` seconds, at most ``max_entries`` (least recent evicted)."""

    def __init__(
        self,
        ttl: Callable[[V], float],
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._values: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._flight: _SingleFlight[K, V] = _SingleFlight()

    def put(self, key: K, value: V) -> None:
        self._values[key] = (self._clock() + self._ttl(value), value)
        self._values.move_to_end(key)
        while len(self._values) > self._max:
            self._values.popitem(last=False)

    async def get(self, key: K, loader: Callable[[], Awaitable[V]]) -> V:
        entry = self._values.get(key)
        if entry is not None and entry[0] >= self._clock():
            self._values.move_to_end(key)
            return entry[1]
        return await self._flight.run(key, loader, lambda value: self.put(key, value))


class BytesCache:
    """Content-addressed bytes (key = sha256) within ``max_bytes``, single-flight loads."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._size = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._flight: _SingleFlight[str, bytes] = _SingleFlight()

    async def get(self, sha256: str, loader: Callable[[], Awaitable[bytes]]) -> bytes:
        if (data := self._items.get(sha256)) is not None:
            self._items.move_to_end(sha256)
            return data
        return await self._flight.run(sha256, loader, lambda data: self._remember(sha256, data))

    def _remember(self, sha256: str, data: bytes) -> None:
        if len(data) > self._max or sha256 in self._items:
            return
        self._items[sha256] = data
        self._size += len(data)
        while self._size > self._max:
            _, evicted = self._items.popitem(last=False)
            self._size -= len(evicted)


class FreshReads(Generic[K, V]):
    """Loads that start after the caller asked, shared by everyone who asked meanwhile.

    The close fence needs a read of the round's control object that began after
    the caller's batch PUT returned; any such read will do. A read already
    running began too early for a newcomer, who waits for it to end and then
    starts (or joins) the next one. So at most one load per key runs at a time,
    and a caller waits for at most two.
    """

    def __init__(self) -> None:
        self._ticks = itertools.count()
        self._running: dict[K, tuple[int, asyncio.Task[V]]] = {}

    async def read(self, key: K, loader: Callable[[], Awaitable[V]]) -> V:
        asked = next(self._ticks)
        while True:
            running = self._running.get(key)
            if running is None:
                started = next(self._ticks)
                task = asyncio.ensure_future(loader())
                self._running[key] = (started, task)
                task.add_done_callback(functools.partial(self._finished, key))
                return await asyncio.shield(task)
            started, task = running
            if started > asked:  # began after we asked: its answer is fresh enough
                return await asyncio.shield(task)
            await asyncio.wait([task])  # began too early; the next one is ours

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        running = self._running.get(key)
        if running is not None and running[1] is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters re-raise it themselves
