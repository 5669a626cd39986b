"""When a leaf's open batch is written: the group-commit rule as a pure function.

Each batch costs the gateway the same whatever its size: one PUT, a share of
the close fence's GET and one lineage PUT, about 2 ms of CPU each in boto3.
Per upload that is the batch's cost divided by its size, so under load the
gateway should write fewer, fuller batches; when it is idle an upload should
not wait long. The rule:

* a full batch (``max_updates``) is written at once;
* otherwise it waits ``max_wait`` seconds after its first update arrived;
* and while the leaf's previous batch is still being *committed* (its PUT, then
  the close fence's read), it waits for that commit to end as well.

The last point is what makes batches adaptive: the slower storage answers, the
longer a batch stays open and the more updates share its PUT, so the number of
S3 requests follows what storage absorbs, not the number of devices. Waiting
for the fence too (not only the PUT) keeps one batch per leaf in commit at a
time, which roughly doubles the updates per PUT under a steady load.
"""

from __future__ import annotations

from enum import Enum


class Flush(Enum):
    """What to do with a leaf's open batch now."""

    WRITE = "write"  # write it now
    WAIT = "wait"  # its timer has not fired yet
    AFTER_COMMIT = "after_commit"  # due, but the leaf's previous batch is still in commit


def flush_decision(*, size: int, expired: bool, committing: bool, max_updates: int) -> Flush:
    """Whether an open batch of ``size`` updates is written now.

    ``expired``: ``max_wait`` has passed since its first update arrived (its timer
    fired). ``committing``: the leaf's previous batch has not finished its PUT and
    fence.
    """
    if size >= max_updates:
        return Flush.WRITE
    if not expired:
        return Flush.WAIT
    return Flush.AFTER_COMMIT if committing else Flush.WRITE
