"""Long polls: a device's poll may wait at the gateway until its job's round changes.

A phone that polls on a pace learns of a new round up to a pace late (0.5 s
and more), and every empty answer costs it a request. With ``?wait=S`` the
gateway holds a poll that has nothing to offer until the job's round moves
(opens, closes, a new round or run, done) or ``S`` seconds pass, then answers
from the fresh state. Gateways stay stateless: the round lives in S3, and one
``RoundWatch`` per gateway re-reads each watched job's ``ActiveRound`` every
``interval`` seconds while anyone waits on it, so the cost is one GET per job
and interval per gateway, whatever the number of waiting phones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from edge.manifests import ActiveRound

log = logging.getLogger("canopy.gateway")

# What a poll's answer depended on: run, round, status and kind of the job's round.
RoundMark = tuple[str, int, str, str] | None


def round_mark(active: ActiveRound | None) -> RoundMark:
    """The parts of an ``ActiveRound`` whose change can change a poll's answer."""
    if active is None:
        return None
    return (active.run_id, active.round, active.status, active.kind)


@dataclass
class _Watched:
    """One job's watch: the last mark read, who waits, and the event of the next change."""

    mark: RoundMark = None
    known: bool = False  # False until the first read: any mark may be stale
    waiters: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None


class RoundWatch:
    """Wakes the polls waiting on a job when a fresh read shows its round moved."""

    def __init__(
        self, read: Callable[[str], Awaitable[ActiveRound | None]], *, interval: float
    ) -> None:
        self._read = read  # an uncached read that also refreshes the gateway's cache
        self.interval = interval
        self._jobs: dict[str, _Watched] = {}

    async def wait_change(self, job: str, seen: RoundMark, timeout: float) -> bool:
        """Wait until ``job``'s round differs from ``seen``; False when ``timeout`` ran out."""
        watched = self._jobs.setdefault(job, _Watched())
        watched.waiters += 1
        if watched.reader is None:
            watched.reader = asyncio.ensure_future(self._follow(job, watched))
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        try:
            while not watched.known or watched.mark == seen:
                left = give_up - loop.time()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watched.changed.wait(), left)
            return True
        finally:
            watched.waiters -= 1

    async def _follow(self, job: str, watched: _Watched) -> None:
        """Re-read the job's round every interval while anyone waits on it."""
        try:
            while watched.waiters > 0:
                try:
                    mark = round_mark(await self._read(job))
                except Exception as exc:  # storage away: the waiters time out and retry
                    log.warning("watching round of %s: %s", job, exc)
                else:
                    if not watched.known or mark != watched.mark:
                        watched.mark, watched.known = mark, True
                        watched.changed.set()
                        watched.changed = asyncio.Event()
                await asyncio.sleep(self.interval)
        finally:
            watched.reader = None
            if watched.waiters == 0:
                self._jobs.pop(job, None)

    async def close(self) -> None:
        for watched in list(self._jobs.values()):
            if watched.reader is not None:
                watched.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watched.reader
