"""A leaf's intake of group-committed update batches from S3, and the round's report count.

``LeafIntake`` reads the batches of one leaf it has not read yet and offers
every update to the pure ``aggregation.collector.LeafCollector``; a corrupt
batch is counted and skipped, never fatal. ``count_reports`` tells the close
task how many uploads have landed across all leaves from key names alone
(``infra.keys.batch_name`` carries each batch's count), one LIST per poll.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aggregation.collector import ACCEPTED, LeafCollector
from edge.manifests import LeafTask
from edge.update_batch import decode_update_batch
from infra.errors import CanopyError
from infra.keys import batch_update_count, round_prefix, updates_prefix
from infra.store import ObjectRef, ObjectStore

CORRUPT_BATCH = "corrupt-batch"


@dataclass
class LeafIntake:
    """Batches read so far for one leaf, and the collector they were offered to."""

    store: ObjectStore
    task: LeafTask
    collector: LeafCollector
    seen: set[str] = field(default_factory=set)
    batches: list[ObjectRef] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return updates_prefix(self.task.job, self.task.run_id, self.task.round, self.task.leaf)

    @property
    def complete(self) -> bool:
        """Every device selected for this leaf has reported: nothing more can count."""
        return len(self.collector.reported) >= len(self.task.selected_device_ids)

    def read_new(self) -> int:
        """Offer the updates of batches not read before; return how many were accepted."""
        accepted = 0
        for key in self.store.list_keys(self.prefix):
            if key in self.seen:
                continue
            self.seen.add(key)
            try:
                obj = self.store.get(key)
                updates = decode_update_batch(obj.data, source=obj.ref.uri)
            except CanopyError as exc:
                # One corrupted batch must not sink the round: count it and move on.
                self.collector.rejected[CORRUPT_BATCH] += 1
                self.collector.rejection_examples.setdefault(CORRUPT_BATCH, str(exc))
                continue
            self.batches.append(obj.ref)
            self.collector.bytes_in += obj.ref.size
            for u in updates:
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


def count_reports(store: ObjectStore, job: str, run_id: str, rnd: int) -> int:
    """Uploads landed for a round across every leaf, from batch key names (one LIST)."""
    return sum(
        batch_update_count(key)
        for key in store.list_keys(f"{round_prefix(job, run_id, rnd)}updates/")
    )
