"""The group-commit rule (edge.gateway.batch_policy.flush_decision), case by case."""

from __future__ import annotations

import pytest

from edge.gateway.batch_policy import Flush, flush_decision


@pytest.mark.parametrize("committing", [False, True])
@pytest.mark.parametrize("expired", [False, True])
def test_a_full_batch_is_written_at_once(expired: bool, committing: bool) -> None:
    decision = flush_decision(size=64, expired=expired, committing=committing, max_updates=64)
    assert decision is Flush.WRITE


@pytest.mark.parametrize("committing", [False, True])
def test_a_young_batch_that_is_not_full_waits_for_its_timer(committing: bool) -> None:
    decision = flush_decision(size=63, expired=False, committing=committing, max_updates=64)
    assert decision is Flush.WAIT


def test_an_expired_batch_is_written_when_its_leaf_has_nothing_in_commit() -> None:
    assert flush_decision(size=1, expired=True, committing=False, max_updates=64) is Flush.WRITE


def test_an_expired_batch_waits_for_its_leafs_commit_in_flight() -> None:
    decision = flush_decision(size=30, expired=True, committing=True, max_updates=64)
    assert decision is Flush.AFTER_COMMIT


def test_a_batch_of_one_update_is_full_when_batches_hold_one() -> None:
    # group_commit_max_updates=1 turns group commit off: every update is its own PUT
    assert flush_decision(size=1, expired=False, committing=True, max_updates=1) is Flush.WRITE
