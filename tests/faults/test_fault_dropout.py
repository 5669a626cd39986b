"""30% device dropout and 10% stragglers: every round ends by its deadline, nothing is lost.

hello-mobile devices train in milliseconds, so stragglers are made real by
giving every device a couple of hundred local epochs: a slow phone (3 to 6
times the compute) then uploads a second or more after the rest, often after
its round closed on enough reports, and gets ``409 late``. With 30% of the asked
devices dropping out after downloading, some rounds only reach their deadline;
all of them must still commit, or be abandoned, on time.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.faults.accounting import account_run, deadline_overruns, reconcile
from tests.faults.conftest import StackMaker
from tests.faults.stack import JOB, run_flow

pytestmark = pytest.mark.slow

DEVICES = 16
DEADLINE_S = 8.0


def test_dropout_and_stragglers_end_every_round_by_its_deadline(make_stack: StackMaker) -> None:
    stack = make_stack()
    sim = stack.simulate(DEVICES, seed=11, dropout=0.3, slow_fraction=0.1, offline_fraction=0.0)
    stack.warm_up(sim)
    run_id = f"drop-{uuid.uuid4().hex[:6]}"

    started = time.monotonic()
    reports = run_flow(
        job=JOB,
        run_id=run_id,
        runtime="pytorch",
        rounds=3,
        tree={"depth": 1, "width": 2},
        cohort_size=8,
        over_selection=1.5,
        min_reports=3,
        round_deadline_s=DEADLINE_S,
        registry_wait_s=30,
        num_devices=DEVICES,
        local_epochs=200,
    )
    elapsed = time.monotonic() - started
    summary = sim.finish()

    # Every round ended, by its deadline, and the run did not hang.
    assert [r.round for r in reports] == [0, 1, 2]
    assert {r.outcome for r in reports} <= {"committed", "abandoned"}
    assert deadline_overruns(reports, DEADLINE_S, slack_s=2.0) == []
    assert elapsed < 3 * (DEADLINE_S + 25)
    assert summary["dropouts"] > 0 and summary["stop_reason"] == "done"

    # Every acknowledged upload is in its committed round's aggregate, exactly once.
    account = account_run(stack.store, JOB, run_id)
    verdict = reconcile(stack.ledger.acknowledged(run_id), account)
    assert verdict.problems == [], verdict.problems
    assert verdict.lost == [] and verdict.doubled == 0, verdict.line()
    assert "committed" in {r.outcome for r in reports} and verdict.acknowledged > 0
    # The taps saw every acknowledgement the simulator counted (the warm-up's too).
    assert len(stack.ledger.receipts()) == summary["accepted"] + summary["duplicates"]
    print(verdict.line(), "| late", summary["late"], "| dropouts", summary["dropouts"])
    print([(r.round, r.outcome, r.devices_reported, r.timings.get("devices")) for r in reports])
