"""The group-commit rule (edge.gateway.batch_policy.flush_decision), case by case."""

from __future__ import annotations

import pytest

from edge.gateway.batch_policy import Flush, flush_decision


@pytest.mark.parametrize("arriving", [0, 3])
@pytest.mark.parametrize("committing", [False, True])
@pytest.mark.parametrize("expired", [False, True])
def test_a_full_batch_is_written_at_once(expired: bool, committing: bool, arriving: int) -> None:
    decision = flush_decision(
        size=64, expired=expired, committing=committing, arriving=arriving, max_updates=64
    )
    assert decision is Flush.WRITE


@pytest.mark.parametrize("expired", [False, True])
def test_with_nothing_arriving_and_nothing_in_commit_a_batch_is_written_at_once(
    expired: bool,
) -> None:
    # Lingering could only add latency: nothing the gateway has seen could join the batch.
    decision = flush_decision(size=1, expired=expired, committing=False, arriving=0, max_updates=64)
    assert decision is Flush.WRITE


def test_with_nothing_arriving_a_batch_waits_the_short_idle_wait_for_a_burst() -> None:
    decision = flush_decision(
        size=1, expired=False, committing=False, arriving=0, max_updates=64, idle=False
    )
    assert decision is Flush.WAIT


def test_a_young_batch_waits_for_uploads_still_arriving() -> None:
    decision = flush_decision(size=5, expired=False, committing=False, arriving=2, max_updates=64)
    assert decision is Flush.WAIT


def test_an_expired_batch_does_not_wait_for_arrivals_any_longer() -> None:
    decision = flush_decision(size=5, expired=True, committing=False, arriving=2, max_updates=64)
    assert decision is Flush.WRITE


@pytest.mark.parametrize("arriving", [0, 2])
@pytest.mark.parametrize("expired", [False, True])
def test_a_batch_that_is_not_full_waits_for_its_leafs_commit_in_flight(
    expired: bool, arriving: int
) -> None:
    decision = flush_decision(
        size=30, expired=expired, committing=True, arriving=arriving, max_updates=64
    )
    assert decision is Flush.AFTER_COMMIT


def test_a_batch_of_one_update_is_full_when_batches_hold_one() -> None:
    # group_commit_max_updates=1 turns group commit off: every update is its own PUT
    decision = flush_decision(size=1, expired=False, committing=True, arriving=5, max_updates=1)
    assert decision is Flush.WRITE
