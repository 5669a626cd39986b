"""kill -9 of a gateway mid-round and of the flow mid-aggregation, then resume by run id.

One fleet (8 devices, none dropping out), two gateway processes behind taps,
and two runs of the same job one after the other:

1. ``base``: uninterrupted, in this process;
2. ``cut``: the flow in a subprocess; gateway ``gw-a`` gets SIGKILL as soon as
   round 1's first batch is in S3 (its devices fail over to ``gw-b``); the flow
   gets SIGKILL once round 2's first leaf partial is written, before the round
   is committed; then the same run id is run again here and resumes at round 2.

The cohort of a round is a pure function of the registry, the seed and the
round (``aggregation.cohort``), every device of it reports, and updates are
deterministic, so the interrupted run must commit the same rounds with the same
devices as the uninterrupted one, and the same models up to float summation
order. Nothing acknowledged may be missing and nothing counted twice.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest

from aggregation.tensors import decode_tensors
from infra.keys import partial_key, updates_prefix
from infra.run_state import read_commit
from tests.faults.accounting import account_run, deadline_overruns, reconcile
from tests.faults.conftest import StackMaker
from tests.faults.stack import JOB, FaultStack, run_flow, wait_for

pytestmark = pytest.mark.slow

DEVICES = 8
DEADLINE_S = 30.0
PARAMS: dict[str, Any] = {
    "job": JOB,
    "runtime": "pytorch",
    "rounds": 3,
    "tree": {"depth": 1, "width": 2},
    "cohort_size": 6,
    "over_selection": 1.0,
    "min_reports": 3,
    "round_deadline_s": DEADLINE_S,
    "registry_wait_s": 30,
    "num_devices": DEVICES,
    "partition": {"kind": "iid"},
}


def landed(stack: FaultStack, run_id: str, rnd: int) -> bool:
    return any(
        stack.store.list_keys(updates_prefix(JOB, run_id, rnd, leaf))
        for leaf in ("leaf-0", "leaf-1")
    )


def leaf_partial_written(stack: FaultStack, run_id: str, rnd: int) -> bool:
    commit = read_commit(stack.store, JOB, run_id)
    if commit is not None and commit.next_round > rnd:
        pytest.fail(f"round {rnd} of {run_id} committed before the flow could be killed")
    return any(
        stack.store.head(partial_key(JOB, run_id, rnd, leaf)) for leaf in ("leaf-0", "leaf-1")
    )


def final_model(stack: FaultStack, run_id: str) -> dict[str, np.ndarray]:
    commit = read_commit(stack.store, JOB, run_id)
    assert commit is not None
    ref = commit.global_model
    data = stack.store.get(ref.key, expected_sha256=ref.sha256).data
    return decode_tensors(data, source=ref.uri)[0]


def test_killed_gateway_and_flow_resume_with_the_same_committed_rounds(
    make_stack: StackMaker,
) -> None:
    stack = make_stack(gateways="process")
    flow = stack.flow_process("cut")  # imports while the fleet starts
    sim = stack.simulate(
        DEVICES,
        seed=3,
        dropout=0.0,
        slow_fraction=0.0,
        offline_fraction=0.0,
        no_until_done=True,
        max_seconds=400,
    )
    stack.warm_up(sim)
    base, cut = f"base-{uuid.uuid4().hex[:6]}", f"cut-{uuid.uuid4().hex[:6]}"

    # 1. The uninterrupted run.
    base_reports = run_flow(**PARAMS, run_id=base)

    # 2. The same run, with a gateway killed mid-round and the flow killed mid-aggregation.
    flow.launch({**PARAMS, "run_id": cut})
    wait_for(lambda: landed(stack, cut, 1), 120, "round 1's first batch", poll=0.02)
    stack.gateways[0].kill()  # type: ignore[union-attr]
    wait_for(lambda: leaf_partial_written(stack, cut, 2), 120, "round 2's leaf partial", 0.02)
    flow.kill()
    commit = read_commit(stack.store, JOB, cut)
    assert commit is not None and commit.next_round == 2  # round 2 was not committed

    # 3. Resume by run id: round 2 is redone, rounds 0 and 1 are not.
    resumed = run_flow(**PARAMS, run_id=cut)
    summary = sim.stop()

    assert [r.round for r in resumed] == [0, 1, 2]
    assert [r.outcome for r in resumed] == [r.outcome for r in base_reports] == ["committed"] * 3
    assert [r.devices_reported for r in resumed] == [r.devices_reported for r in base_reports]
    assert resumed[2].flow_run_id != resumed[1].flow_run_id  # round 2 came from the resumed run
    assert deadline_overruns(resumed, DEADLINE_S, slack_s=3.0) == []

    base_account, cut_account = (account_run(stack.store, JOB, r) for r in (base, cut))
    assert cut_account.committed == base_account.committed  # same rounds, same devices
    for run_id, account in ((base, base_account), (cut, cut_account)):
        verdict = reconcile(stack.ledger.acknowledged(run_id), account)
        assert verdict.problems == [], (run_id, verdict.problems)
        assert verdict.lost == [] and verdict.doubled == 0, (run_id, verdict.line())
        print(run_id, verdict.line())
    assert stack.ledger.acknowledged(cut)  # the cut run's devices were acknowledged
    assert len(stack.ledger.receipts()) == summary["accepted"] + summary["duplicates"]
    assert summary["failovers"] > 0  # devices of the killed gateway moved to the other one

    # The same models, up to the order in which float64 partial sums were added.
    models = [final_model(stack, r) for r in (base, cut)]
    for name in models[0]:
        np.testing.assert_allclose(models[1][name], models[0][name], rtol=1e-6, atol=1e-7)
    print("bit-identical:", all(np.array_equal(models[0][n], models[1][n]) for n in models[0]))
