"""A leaf's intake of group-committed update batches from S3, and the round's report count.

``LeafIntake`` reads the batches of one leaf it has not read yet and offers
every update to the pure ``aggregation.collector.LeafCollector``. A batch is
judged once its bytes are in hand: bytes that fail their sha256
(``IntegrityError``) or do not decode as an update batch are counted
``corrupt-batch`` and skipped for good, never fatal. A batch S3 would not hand
over (a ``StoreError`` through every retry: an outage, a cut download, a
listing that failed) is *not* judged: it stays unread, is recorded in
``unreadable``, and the next ``read_new`` tries it again. Dropping it would
drop updates a gateway acknowledged. ``settled`` says whether the last poll
listed the leaf and read or judged every batch it listed, which is what the
leaf's collection (``tasks.collect``) waits for after the round closed.
``count_reports`` tells the close task how many uploads have landed across all
leaves from key names alone (``infra.keys.batch_name`` carries each batch's
count), one LIST per poll.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aggregation.collector import ACCEPTED, LeafCollector
from edge.manifests import LeafTask
from edge.update_batch import DeviceUpdate, decode_update_batch
from infra.errors import IntegrityError, StoreError
from infra.keys import batch_update_count, round_prefix, updates_prefix
from infra.store import ObjectRef, ObjectStore, StoredObject

CORRUPT_BATCH = "corrupt-batch"


@dataclass
class LeafIntake:
    """Batches read so far for one leaf, and the collector they were offered to.

    ``seen`` holds the batches read or judged corrupt (never read again);
    ``unreadable`` the listed batches S3 would not hand over yet, with the last
    error (read again on the next poll); ``list_error`` the last poll's listing
    failure, if any; ``read_failures`` counts every transient failure so far.
    """

    store: ObjectStore
    task: LeafTask
    collector: LeafCollector
    seen: set[str] = field(default_factory=set)
    batches: list[ObjectRef] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    list_error: str | None = None
    read_failures: int = 0

    @property
    def prefix(self) -> str:
        return updates_prefix(self.task.job, self.task.run_id, self.task.round, self.task.leaf)

    @property
    def complete(self) -> bool:
        """Every device selected for this leaf has reported: nothing more can count."""
        return len(self.collector.reported) >= len(self.task.selected_device_ids)

    @property
    def settled(self) -> bool:
        """The last poll listed the leaf and read (or judged corrupt) every batch listed."""
        return self.list_error is None and not self.unreadable

    def read_new(self) -> int:
        """Offer the updates of batches not read before; return how many were accepted.

        Never raises for S3 trouble: a failed listing or read is recorded
        (``list_error``, ``unreadable``) and retried by the next call.
        """
        try:
            listed = self.store.list_keys(self.prefix)
        except StoreError as exc:
            self.list_error = str(exc)
            self.read_failures += 1
            return 0
        self.list_error = None
        # A batch no longer listed (deleted by hand) cannot be waited for.
        self.unreadable = {k: v for k, v in self.unreadable.items() if k in listed}
        accepted = 0
        for key in listed:
            if key in self.seen:
                continue
            got = self._read(key)
            if got is None:
                continue
            obj, batch = got
            self.batches.append(obj.ref)
            self.collector.bytes_in += obj.ref.size
            for u in batch:
                outcome = self.collector.offer(
                    device_id=u.device_id,
                    task_id=u.task_id,
                    model_version=u.model_version,
                    num_samples=u.num_samples,
                    tensors=u.tensors,
                    metrics=u.metrics,
                )
                accepted += outcome == ACCEPTED
        return accepted

    def _read(self, key: str) -> tuple[StoredObject, list[DeviceUpdate]] | None:
        """One batch's bytes and updates; None when it is corrupt or must be read again."""
        try:
            obj = self.store.get(key)
        except IntegrityError as exc:  # the bytes came and are not what was written
            self._corrupt(key, exc)
            return None
        except StoreError as exc:  # S3 did not hand the bytes over: not the batch's fault
            self.unreadable[key] = str(exc)
            self.read_failures += 1
            return None
        try:
            updates = decode_update_batch(obj.data, source=obj.ref.uri)
        except ValueError as exc:  # ValidationError: not a well-formed update batch
            self._corrupt(key, exc)
            return None
        self.seen.add(key)
        self.unreadable.pop(key, None)
        return obj, updates

    def _corrupt(self, key: str, exc: Exception) -> None:
        """One corrupted batch must not sink the round: count it, never read it again."""
        self.seen.add(key)
        self.unreadable.pop(key, None)
        self.collector.rejected[CORRUPT_BATCH] += 1
        self.collector.rejection_examples.setdefault(CORRUPT_BATCH, str(exc))


def count_reports(store: ObjectStore, job: str, run_id: str, rnd: int) -> int:
    """Uploads landed for a round across every leaf, from batch key names (one LIST)."""
    return sum(
        batch_update_count(key)
        for key in store.list_keys(f"{round_prefix(job, run_id, rnd)}updates/")
    )
