"""When a leaf's open batch is written: the group-commit rule as a pure function.

Each batch costs the gateway the same whatever its size: one PUT, a share of
the close fence's GET and one lineage PUT, about 2 ms of CPU each in boto3.
Per upload that is the batch's cost divided by its size, so under load the
gateway should write fewer, fuller batches; when it is idle an upload should
not wait at all. The rule:

* a full batch (``max_updates``) is written at once;
* while the leaf's previous batch is still being *committed* (its PUT, then the
  close fence's read), it waits for that commit to end;
* otherwise it waits while more uploads of the leaf are *arriving* (admitted at
  the door, their bodies being read or checked), but no longer than
  ``max_wait`` seconds after its first update arrived;
* and with nothing arriving it waits until no update has joined for
  ``idle_wait`` (20 ms by default; still at most ``max_wait`` in all): the
  uploads of a burst (a cohort that trains in no time uploads within
  milliseconds) keep sharing a PUT, while a lone upload, such as the round's
  last one, which its close waits for, waits 20 ms instead of ``max_wait``.

The commit rule is what makes batches adaptive: the slower storage answers, the
longer a batch stays open and the more updates share its PUT, so the number of
S3 requests follows what storage absorbs, not the number of devices. Waiting
for the fence too (not only the PUT) keeps one batch per leaf in commit at a
time, which roughly doubles the updates per PUT under a steady load. Under load
uploads keep arriving, so batches fill for ``max_wait`` as before; an idle
gateway (the last uploads of a round, which the round's close waits for) writes
a lone update ``idle_wait`` after it is checked instead of ``max_wait`` later.
"""

from __future__ import annotations

from enum import Enum


class Flush(Enum):
    """What to do with a leaf's open batch now."""

    WRITE = "write"  # write it now
    WAIT = "wait"  # its timer has not fired yet
    AFTER_COMMIT = "after_commit"  # due, but the leaf's previous batch is still in commit


def flush_decision(
    *,
    size: int,
    expired: bool,
    committing: bool,
    arriving: int,
    max_updates: int,
    idle: bool = True,
) -> Flush:
    """Whether an open batch of ``size`` updates is written now.

    ``expired``: ``max_wait`` has passed since its first update arrived (its timer
    fired). ``committing``: the leaf's previous batch has not finished its PUT and
    fence. ``arriving``: uploads of the leaf admitted at the door and not yet in the
    batch (or turned away). ``idle``: ``idle_wait`` has passed since its last
    update joined.
    """
    if size >= max_updates:
        return Flush.WRITE
    if committing:
        return Flush.AFTER_COMMIT
    if not expired and (arriving > 0 or not idle):
        return Flush.WAIT
    return Flush.WRITE
