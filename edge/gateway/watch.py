"""Long polls: a device's poll may wait at the gateway until its job's round changes.

A phone that polls on a pace learns of a new round up to a pace late (0.5 s
and more), and every empty answer costs it a request. With ``?wait=S`` the
gateway holds a poll that has nothing to offer until the job's round moves
(opens, closes, a new round or run, done) or ``S`` seconds pass, then answers
from the fresh state. Gateways stay stateless: the round lives in S3, and one
``RoundWatch`` per gateway re-reads each watched job's ``ActiveRound`` every
``interval`` seconds while anyone waits on it, so the cost is one GET per job
and interval per gateway, whatever the number of waiting phones.

**Faster right after a close.** What a round's phones wait for is the *open*:
every selected phone hears of its task one watch period (plus a GET) after the
flow wrote the pointer, and that wait is the first step of the round's devices
phase. The open comes shortly after the previous round (or its training) closed,
while the flow aggregates. So while the pointer says ``closed`` and the close is
less than ``soon_window`` seconds old, the watch reads every ``soon_interval``
seconds (50 ms by default, not 100): the open is heard about 25 ms sooner on
average, for a bounded number of extra GETs per round (``soon_window /
soon_interval`` at most, per gateway and watched job), and never more than the
slow rate while a round is open, finished or left closed by a flow that died.
Faster still would cost S3 (moto here) more reads than it saves: the nudge
below is the way to hear of an open at once.
``next_read_in`` is that rule, as a pure function.

**A nudge is faster still.** Whoever writes the pointer (the round flow) may say
so: ``nudge(job)`` (``POST /v1/jobs/{job}/wake``) cuts the watch's pause short,
so its next read starts at once and waiting phones hear of the round one GET
after the write, not a period later. A nudge is only a hint (the read decides
what changed), needs no trust, and cannot make a gateway read more often than
once per ``min_gap`` (20 ms) per watched job, however many arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from edge.manifests import ActiveRound

log = logging.getLogger("canopy.gateway")

# What a poll's answer depended on: run, round, status and kind of the job's round.
RoundMark = tuple[str, int, str, str] | None


def round_mark(active: ActiveRound | None) -> RoundMark:
    """The parts of an ``ActiveRound`` whose change can change a poll's answer."""
    if active is None:
        return None
    return (active.run_id, active.round, active.status, active.kind)


def next_read_in(
    active: ActiveRound | None,
    now: datetime,
    *,
    interval: float,
    soon_interval: float,
    soon_window: float,
) -> float:
    """Seconds until the watch reads a job's round again, after it read ``active``.

    ``soon_interval`` while the round closed less than ``soon_window`` seconds ago (by
    the pointer's ``closed_at``; a clock skew of up to the window either way is
    tolerated), since the next round's open is then imminent and phones wait for it;
    ``interval`` otherwise.
    """
    if active is None or active.status != "closed" or active.closed_at is None:
        return interval
    age = (now - active.closed_at).total_seconds()
    return soon_interval if -soon_window < age < soon_window else interval


@dataclass
class _Watched:
    """One job's watch: the last mark read, who waits, and the event of the next change."""

    mark: RoundMark = None
    known: bool = False  # False until the first read: any mark may be stale
    waiters: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None
    nudged: asyncio.Event = field(default_factory=asyncio.Event)  # read again now
    read_started: float = float("-inf")  # loop time of the last read's start


class RoundWatch:
    """Wakes the polls waiting on a job when a fresh read shows its round moved."""

    def __init__(
        self,
        read: Callable[[str], Awaitable[ActiveRound | None]],
        *,
        interval: float,
        soon_interval: float | None = None,
        soon_window: float = 0.0,
        min_gap: float = 0.02,
    ) -> None:
        self._read = read  # an uncached read that also refreshes the gateway's cache
        self.interval = interval
        self.soon_interval = interval if soon_interval is None else soon_interval
        self.soon_window = soon_window
        self.min_gap = min_gap
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

    def nudge(self, job: str) -> bool:
        """Read ``job``'s round now (or as soon as the read rate allows) if anyone waits
        on it; whether anyone does."""
        watched = self._jobs.get(job)
        if watched is None or watched.waiters <= 0:
            return False
        watched.nudged.set()
        return True

    async def _pause(self, watched: _Watched, seconds: float) -> None:
        """Sleep ``seconds`` or until nudged, but keep reads ``min_gap`` apart."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watched.nudged.wait(), seconds)
        watched.nudged.clear()
        loop = asyncio.get_running_loop()
        gap = self.min_gap - (loop.time() - watched.read_started)
        if gap > 0:
            await asyncio.sleep(gap)

    async def _follow(self, job: str, watched: _Watched) -> None:
        """Re-read the job's round every interval (or when nudged) while anyone waits."""
        loop = asyncio.get_running_loop()
        try:
            while watched.waiters > 0:
                pause = self.interval
                watched.read_started = loop.time()
                try:
                    active = await self._read(job)
                except Exception as exc:  # storage away: the waiters time out and retry
                    log.warning("watching round of %s: %s", job, exc)
                else:
                    mark = round_mark(active)
                    if not watched.known or mark != watched.mark:
                        watched.mark, watched.known = mark, True
                        watched.changed.set()
                        watched.changed = asyncio.Event()
                    pause = next_read_in(
                        active,
                        datetime.now(UTC),
                        interval=self.interval,
                        soon_interval=self.soon_interval,
                        soon_window=self.soon_window,
                    )
                await self._pause(watched, pause)
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
