"""Lineage records of a round's intermediate outputs, written beside the round, not in its way.

Between a round's close and the next round's open, every step stores its
output and then its lineage record: on this machine's moto each PUT is a few
milliseconds, more under load, and a record is a PUT the next step never reads.
The steps on that path (a leaf's partial, each sum, the root's model) hand
their record to ``deferred(rnd)`` instead: a thread of the flow writes it, still
strictly after the objects it describes, and the step returns at once.
``commit-round`` waits for the round's records (``settle``) before it writes
the report, so a committed round never lacks a record, and a record that
could not be written fails the commit like any failed write. Outside a
``federated-training`` run (an edge worker's leaf, a unit test) there is no
one to wait, so records are written in place as before.
"""

from __future__ import annotations

import contextvars
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from infra.outputs import Later
from tasks.run_cache import open_cache

WRITERS = 4


class DeferredWrites:
    """Writes handed over per round, run in a small pool; a round's are awaited together."""

    def __init__(self, writers: int = WRITERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="canopy-records")
        self._pending: dict[int, list[Future[Any]]] = defaultdict(list)
        self._lock = threading.Lock()

    def later(self, rnd: int) -> Later:
        def hand_over(write: Callable[[], Any]) -> None:
            context = contextvars.copy_context()  # the run's Prefect context, for its events
            future = self._pool.submit(context.run, write)
            with self._lock:
                self._pending[rnd].append(future)

        return hand_over

    def settle(self, rnd: int) -> None:
        """Wait for every write handed over for ``rnd``; raise the first that failed."""
        with self._lock:
            futures = self._pending.pop(rnd, [])
        errors = [e for f in futures if (e := f.exception()) is not None]
        if errors:
            raise errors[0]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def deferred(rnd: int) -> Later | None:
    """Where a step of round ``rnd`` hands its lineage record; None: write it in place."""
    cache = open_cache()
    return cache.deferred_writes().later(rnd) if cache is not None else None


def settle(rnd: int) -> None:
    """Every record handed over for round ``rnd`` is written (or the first error raised)."""
    cache = open_cache()
    if cache is not None:
        cache.deferred_writes().settle(rnd)
