"""Handoffs between subflows running side by side, and the in-process close signal."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.encoders import jsonable_encoder
from prefect.utilities.collections import visit_collection

from tasks.close_signal import announce_closed, pause_unless_closed
from tasks.handoff import Boundary, RoundLink, UpstreamFailedError, handoff
from tasks.run_cache import run_cache


def test_a_consumer_gets_the_value_the_moment_it_is_set() -> None:
    async def scenario() -> list[str]:
        h = handoff("r0001-level-0-leaves")
        seen: list[str] = []

        async def consumer() -> None:
            seen.append(await h.get())

        waiting = asyncio.ensure_future(consumer())
        await asyncio.sleep(0)
        assert h.peek() is None and not h.done()
        h.set("partials")
        await waiting
        return seen

    assert asyncio.run(scenario()) == ["partials"]


def test_a_failed_producer_names_what_never_came() -> None:
    async def scenario() -> None:
        h = handoff("r0001 open-round")
        h.fail(ValueError("S3 said no"))
        with pytest.raises(UpstreamFailedError, match=r"open-round did not finish.*S3 said no"):
            await h.get()
        assert h.peek() is None

    asyncio.run(scenario())


def test_a_cancelled_consumer_leaves_the_value_for_the_others() -> None:
    async def scenario() -> str:
        h = handoff("root")
        first = asyncio.ensure_future(h.get())
        await asyncio.sleep(0)
        first.cancel()
        h.set("model")
        return str(await h.get())

    assert asyncio.run(scenario()) == "model"


def test_prefect_sees_only_the_source_and_keeps_the_value_in_memory() -> None:
    async def scenario() -> None:
        link = RoundLink(round=3, start=Boundary.before(3), end=Boundary.before(4))
        # what the API stores as the subflow's parameter: names, never the value
        shown = jsonable_encoder(link)
        assert shown["start"]["basis"] == {"source": "round 2's new model"}
        assert shown["end"]["opened"] == {"source": "round 4's opening"}
        # Prefect copies parameters; the copy must wait on the same value
        copied = visit_collection(link, lambda x: x, return_data=True)
        link.start.basis.set("commit-2")
        assert await copied.start.basis.get() == "commit-2"

    asyncio.run(scenario())


def test_a_resumed_boundary_starts_from_the_commit_and_a_failed_one_stops_the_next() -> None:
    async def scenario() -> None:
        start = Boundary.resumed(type("Commit", (), {"next_round": 5})())
        assert start.round == 5 and start.basis.done() and start.committed.done()
        assert not start.opened.done()
        end = Boundary.before(6)
        end.fail(RuntimeError("evaluation broke"))
        for h in (end.basis, end.committed):
            with pytest.raises(UpstreamFailedError, match="round 5's"):
                await h.get()

    asyncio.run(scenario())


def test_the_close_task_wakes_this_process_leaves_at_once() -> None:
    async def scenario() -> float:
        async def close_soon() -> None:
            await asyncio.sleep(0.05)
            announce_closed("job", "run", 2, "train")

        with run_cache():
            t0 = time.monotonic()
            await asyncio.gather(pause_unless_closed("job", "run", 2, "train", 5.0), close_soon())
            return time.monotonic() - t0

    assert asyncio.run(scenario()) < 2.0


def test_another_round_or_a_process_without_the_run_waits_its_poll() -> None:
    async def scenario() -> tuple[float, float]:
        with run_cache():
            announce_closed("job", "run", 2, "train")
            t0 = time.monotonic()
            await pause_unless_closed("job", "run", 3, "train", 0.2)  # not this round
            other = time.monotonic() - t0
        announce_closed("job", "run", 2, "train")  # no run cache: nobody to tell
        t0 = time.monotonic()
        await pause_unless_closed("job", "run", 2, "train", 0.2)
        return other, time.monotonic() - t0

    other_round, no_cache = asyncio.run(scenario())
    assert other_round >= 0.19 and no_cache >= 0.19
