"""Word, inside one flow process, that a round was just closed: leaves need not wait a poll.

The close task and in-process leaves run on one event loop. A leaf used to
learn of the close from its next read of the pointer, up to a poll interval
(0.25 s) later, and every level above it waited that long too. The close task
now also sets an event in the run's cache; a leaf's pause between polls ends
there. The pointer in S3 stays the only truth: a woken leaf reads it again
before its last listing, so a leaf elsewhere (an edge worker, no shared
cache) simply polls as before.
"""

from __future__ import annotations

import asyncio
import contextlib

from tasks.run_cache import current_cache


def announce_closed(job: str, run_id: str, rnd: int, kind: str) -> None:
    """The round's pointer now says closed (written by this process)."""
    current_cache().close_event(job, run_id, rnd, kind).set()


async def pause_unless_closed(job: str, run_id: str, rnd: int, kind: str, seconds: float) -> None:
    """Sleep ``seconds``, or less if this process closes the round meanwhile."""
    event = current_cache().close_event(job, run_id, rnd, kind)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=seconds)
