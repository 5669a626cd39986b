"""S3 misbehaving under the gateways and the flow: retried, nothing lost, nothing doubled.

Gateways and the flow each reach moto through their own ``FaultyProxy``; 10% of
their requests get a 500, a 503 ``SlowDown``, a 300 ms delay, a reset before
the request reached S3, or a reset after S3 applied it (the client retries a
PUT that already happened). boto3's retries (``infra/store.py``: standard mode,
5 retries) absorb every one of them; the gateways answer ``503`` when a batch
write still fails, and devices upload again. A batch whose write (or whose
close-fence read) is slowed past the round's close is answered ``409 late``
although the leaf may still sum it: aggregated without an acknowledgement is
allowed, an acknowledgement without aggregation is not. The verdict is read
from moto directly, past the proxies.
"""

from __future__ import annotations

import uuid

import pytest

from tests.faults.accounting import account_run, deadline_overruns, reconcile
from tests.faults.conftest import StackMaker
from tests.faults.stack import JOB, run_flow
from tests.support.faulty_s3 import FaultPlan

pytestmark = pytest.mark.slow

DEVICES = 12
DEADLINE_S = 25.0
MIX = {"error500": 1.0, "error503": 1.0, "slow": 1.0, "reset": 1.0, "drop_response": 1.0}


def test_s3_faults_under_gateways_and_flow_are_retried_nothing_lost_or_doubled(
    make_stack: StackMaker,
) -> None:
    plan = FaultPlan(rate=0.10, kinds=MIX, delay_s=0.3, seed=5)  # type: ignore[arg-type]
    stack = make_stack(s3_plan=plan)
    sim = stack.simulate(DEVICES, seed=5, dropout=0.0, slow_fraction=0.0, offline_fraction=0.0)
    stack.warm_up(sim)
    run_id = f"s3f-{uuid.uuid4().hex[:6]}"

    reports = run_flow(
        job=JOB,
        run_id=run_id,
        runtime="pytorch",
        rounds=3,
        tree={"depth": 1, "width": 2},
        cohort_size=8,
        over_selection=1.25,
        min_reports=3,
        round_deadline_s=DEADLINE_S,
        registry_wait_s=30,
        num_devices=DEVICES,
    )
    summary = sim.finish()

    # Both sides were hit, by every kind of fault.
    gateways, flow = (stack.s3_proxies[side].stats() for side in ("gateways", "flow"))
    assert gateways.injected_total > 0 and flow.injected_total > 0
    assert set(gateways.by_kind() + flow.by_kind()) == set(MIX)

    # The run went on: every round ended by its deadline, and committed.
    assert [r.round for r in reports] == [0, 1, 2]
    assert all(r.outcome == "committed" for r in reports), [r.reason for r in reports]
    assert deadline_overruns(reports, DEADLINE_S, slack_s=5.0) == []

    # Every acknowledged upload is in its committed round, exactly once.
    verdict = reconcile(stack.ledger.acknowledged(run_id), account_run(stack.store, JOB, run_id))
    assert verdict.problems == [], verdict.problems
    assert verdict.lost == [] and verdict.doubled == 0, verdict.line()
    assert verdict.acknowledged > 0 and verdict.aggregated >= sum(
        r.devices_reported for r in reports
    )
    assert len(stack.ledger.receipts()) == summary["accepted"] + summary["duplicates"]
    print(
        verdict.line(),
        "| injected: gateways",
        dict(gateways.by_kind()),
        "flow",
        dict(flow.by_kind()),
        "| device answers",
        dict(stack.ledger.answers),
    )
