"""The objects this process has just written, so that reading them back costs no request.

A round's flow writes a partial, then a task beside it reads it straight back
to add it (a leaf's partial to its aggregator, the root's to the strategy, the
new global model to the next round's dispatch and to the evaluation): on the
critical path between the round's close and the next round's open, each of
those GETs was a round trip to S3 for bytes the process already held. A read
is served from here only when the caller names the sha256 it expects and the
remembered bytes have it, which is exactly what a GET's verification would
have accepted; anything else (another key, another version, a read without an
expected hash, bytes past the budget) goes to S3 as before. A reference is to
content (its sha256), so it gets that content even if the key was written again
since; a reader holding the new reference gets the new bytes from S3.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infra.store import StoredObject

DEFAULT_BUDGET_BYTES = 64 * 1024 * 1024


class RecentWrites:
    """Least recently written first out, within a byte budget; thread-safe."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._objects: OrderedDict[str, StoredObject] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0

    def remember(self, obj: StoredObject) -> None:
        size = len(obj.data)
        with self._lock:
            self._drop(obj.ref.key)
            if size > self.budget_bytes:
                return
            self._objects[obj.ref.key] = obj
            self._bytes += size
            while self._bytes > self.budget_bytes:
                self._drop(next(iter(self._objects)))

    def get(self, key: str, sha256: str) -> StoredObject | None:
        """The object written under ``key`` if its bytes have ``sha256``; else None."""
        with self._lock:
            obj = self._objects.get(key)
            if obj is None or obj.ref.sha256 != sha256:
                return None
            self.hits += 1
            return obj

    def forget(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: str) -> None:
        gone = self._objects.pop(key, None)
        if gone is not None:
            self._bytes -= len(gone.data)
