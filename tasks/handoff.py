"""Values one running subflow hands to another in the same flow process, as soon as they exist.

A round's level subflows, and consecutive rounds, run side by side instead of one
after the other (docs/orchestration.md, "Pipelined rounds"): creating a Prefect
flow run costs a few API calls (0.1-0.3 s on SQLite), and started early those
calls happen while devices train instead of between one level's last sum and the
next level's first. The subflow that needs a value awaits a ``Handoff``; the one
that makes it sets it the moment it exists.

A ``Handoff`` is a flow parameter like any other: Prefect shows it as
``{"source": ...}`` (what it waits for), and the value travels in process
memory, never through the API. Only references and small results go through
one, as through Prefect results (tensors stay in S3). A producer that fails
sets the failure instead, so a consumer raises ``UpstreamFailedError`` naming
the step it waited for, and never waits forever.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr

from infra.errors import CanopyError


class UpstreamFailedError(CanopyError):
    """The step a subflow waited for failed, so this one cannot go on."""


class Handoff(BaseModel):
    """One value from a producer to its consumers in this process (an ``asyncio.Future``)."""

    model_config = ConfigDict(frozen=True)

    source: str  # what the value comes from, as Prefect's UI shows the parameter
    _future: asyncio.Future[Any] | None = PrivateAttr(default=None)

    @classmethod
    def ready(cls, source: str, value: Any) -> Handoff:
        """A handoff that already holds ``value`` (the first round's inputs)."""
        handoff = cls(source=source)
        handoff.set(value)
        return handoff

    def _fut(self) -> asyncio.Future[Any]:
        if self._future is None:  # bound to the loop of the first caller: the flow's
            self._future = asyncio.get_running_loop().create_future()
        return self._future

    def set(self, value: Any) -> None:
        """Hand the value over; every consumer waiting on it resumes."""
        fut = self._fut()
        if not fut.done():
            fut.set_result(value)

    def fail(self, error: BaseException) -> None:
        """The producer failed: consumers raise ``UpstreamFailedError`` instead of waiting."""
        fut = self._fut()
        if not fut.done():
            why = f"{type(error).__name__}: {error}"
            fut.set_exception(UpstreamFailedError(f"{self.source} did not finish ({why})"))
            fut.exception()  # consumers may never come; no "exception never retrieved" warning

    def done(self) -> bool:
        return self._future is not None and self._future.done()

    def peek(self) -> Any:
        """The value if it is there already, else None (never waits, never raises)."""
        fut = self._future
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
            return None
        return fut.result()

    async def get(self) -> Any:
        """The value, once the producer has set it (``asyncio.shield``: a consumer that is
        cancelled leaves the value for the others)."""
        return await asyncio.shield(self._fut())

    def __await__(self) -> Any:
        return self.get().__await__()


def handoff(source: str) -> Handoff:
    """A new, empty handoff for ``source`` (created inside the flow's event loop)."""
    created = Handoff(source=source)
    created._fut()
    return created


class Boundary(BaseModel):
    """Between round r-1 and round r: what round r starts from, and when it opened.

    ``basis`` is the record round r-1 will commit, minus its report (``tasks.reporting.
    advance``), set as soon as round r-1's root has finished (or its devices'
    evaluation, which needs the pointer); ``committed`` is that record once written.
    ``opened`` holds the gateways' late-upload counters read as round r opened: it
    ends round r-1's window for counting late uploads, so overlapping rounds never
    count one twice.
    """

    model_config = ConfigDict(frozen=True)

    round: int
    basis: Handoff
    committed: Handoff
    opened: Handoff

    @classmethod
    def before(cls, rnd: int) -> Boundary:
        what = f"round {rnd - 1}"
        return cls(
            round=rnd,
            basis=handoff(f"{what}'s new model"),
            committed=handoff(f"{what}'s commit"),
            opened=handoff(f"round {rnd}'s opening"),
        )

    @classmethod
    def resumed(cls, commit: Any) -> Boundary:
        """The boundary a run starts or resumes at: its commit record is both basis and commit."""
        rnd = commit.next_round
        return cls(
            round=rnd,
            basis=Handoff.ready("the run's commit", commit),
            committed=Handoff.ready("the run's commit", commit),
            opened=handoff(f"round {rnd}'s opening"),
        )

    def fail(self, error: BaseException) -> None:
        """The round before this boundary failed: the next one must not start or commit."""
        self.basis.fail(error)
        self.committed.fail(error)


class RoundLink(BaseModel):
    """A round's two boundaries: ``start`` (from the round before) and ``end`` (to the next)."""

    model_config = ConfigDict(frozen=True)

    round: int
    start: Boundary
    end: Boundary
