"""The fault scenarios, written once: tests under tests/faults assert, the benchmark prints.

Each function drives one scenario on a ``FaultStack`` (``tests.faults.stack``)
and returns an ``Outcome``: the figures (rounds committed and abandoned,
uploads acknowledged and aggregated, lost, counted twice, faults injected by
kind, device answers, wall time) and ``problems``, every property of the
scenario that did not hold. A test asserts ``outcome.problems == []`` (plus
what it wants to show); ``benchmarks/faults.py`` runs the same functions with
larger fleets and prints the figures. Sizes are parameters; the defaults are
the tests'.

The judge is always S3 read directly (``stack.store``, past any fault proxy)
and the receipt ledger of the taps in front of the gateways
(``tests.faults.accounting``), never the code under test.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregation.tensors import decode_tensors
from infra.keys import partial_key, updates_prefix
from infra.run_state import RoundReport, read_commit, read_reports
from tests.faults.accounting import (
    Reconciliation,
    account_run,
    deadline_overruns,
    reconcile,
)
from tests.faults.stack import (
    JOB,
    FaultStack,
    PrefectServer,
    Simulator,
    StackError,
    StackMaker,
    round_open,
    run_flow,
    wait_for,
)
from tests.support.faulty_s3 import FaultKind, FaultPlan

# The S3 fault mix of the S3 scenario: every kind the proxy knows, all of which
# Canopy's S3 client must retry (a cut download since S3ObjectStore.get retries it).
S3_MIX: dict[FaultKind, float] = {
    "error500": 1.0,
    "error503": 1.0,
    "slow": 1.0,
    "reset": 1.0,
    "drop_response": 1.0,
    "truncate": 1.0,
}


@dataclass
class Outcome:
    """What one scenario did, and what did not hold."""

    scenario: str
    committed: int = 0
    abandoned: int = 0
    acknowledged: int = 0
    aggregated: int = 0
    lost: int = 0
    doubled: int = 0
    faults: Counter[str] = field(default_factory=Counter)  # injected, by kind
    answers: Counter[str] = field(default_factory=Counter)  # device upload answers
    bad_inputs: int = 0
    wall_s: float = 0.0
    devices: int = 0
    rounds: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verdicts: dict[str, Reconciliation] = field(default_factory=dict)
    reports: dict[str, list[RoundReport]] = field(default_factory=dict)
    simulator: dict[str, Any] = field(default_factory=dict)

    def expect(self, holds: bool, what: str) -> None:
        """Record ``what`` as a problem unless it ``holds``."""
        if not holds:
            self.problems.append(what)

    def judge(self, stack: FaultStack, run_id: str) -> Reconciliation:
        """Reconcile ``run_id``'s acknowledgements with S3; add its figures to the outcome."""
        account = account_run(stack.store, JOB, run_id)
        verdict = reconcile(stack.ledger.acknowledged(run_id), account)
        self.verdicts[run_id] = verdict
        self.reports[run_id] = account.reports
        self.committed += len(account.committed)
        self.abandoned += len(account.abandoned)
        self.acknowledged += verdict.acknowledged
        self.aggregated += verdict.aggregated
        self.lost += len(verdict.lost)
        self.doubled += verdict.doubled
        self.problems += [f"{run_id}: {p}" for p in verdict.problems]
        self.expect(not verdict.lost, f"{run_id}: acknowledged but not aggregated: {verdict.lost}")
        self.expect(verdict.doubled == 0, f"{run_id}: {verdict.doubled} update(s) counted twice")
        return verdict

    def finish(self, stack: FaultStack, summary: dict[str, Any], started: float) -> None:
        """The simulator's summary and the taps' answers; every receipt is on both records."""
        self.simulator = summary
        self.answers = Counter(stack.ledger.answers)
        receipts = len(stack.ledger.receipts())
        self.expect(
            receipts == summary["accepted"] + summary["duplicates"],
            f"the taps relayed {receipts} receipts, the simulator counted "
            f"{summary['accepted']} accepted + {summary['duplicates']} duplicates",
        )
        self.wall_s = time.monotonic() - started


def _params(
    *, rounds: int, devices: int, cohort: int, over_selection: float, deadline_s: float
) -> dict[str, Any]:
    return {
        "job": JOB,
        "runtime": "pytorch",
        "rounds": rounds,
        "tree": {"depth": 1, "width": 2},
        "cohort_size": cohort,
        "over_selection": over_selection,
        "min_reports": min(3, cohort),
        "round_deadline_s": deadline_s,
        "registry_wait_s": 30,
        "num_devices": devices,
    }


def _rounds_ended(out: Outcome, reports: Sequence[RoundReport], rounds: int) -> None:
    out.expect(
        [r.round for r in reports] == list(range(rounds)),
        f"rounds recorded {[r.round for r in reports]}, not 0..{rounds - 1}",
    )
    out.expect(
        {r.outcome for r in reports} <= {"committed", "abandoned"},
        f"outcomes {[r.outcome for r in reports]}",
    )


# ---------------------------------------------------------------- dropout and stragglers


def dropout_and_stragglers(
    make: StackMaker,
    *,
    devices: int = 16,
    rounds: int = 3,
    cohort: int = 8,
    deadline_s: float = 8.0,
    local_epochs: int = 200,
    seed: int = 11,
) -> Outcome:
    """30% of the asked devices drop out after downloading, 10% are slow: every round ends.

    hello-mobile devices train in milliseconds, so stragglers are made real by
    giving every device a couple of hundred local epochs: a slow phone (3 to 6
    times the compute) then uploads a second or more after the rest, often
    after its round closed on enough reports, and gets ``409 late``. With 30%
    of the asked devices dropping out, some rounds only reach their deadline;
    all must commit or be abandoned on time, and nothing acknowledged is lost.
    """
    started = time.monotonic()
    out = Outcome("dropout 30% + stragglers 10%", devices=devices, rounds=rounds)
    stack = make()
    sim = stack.simulate(devices, seed=seed, dropout=0.3, slow_fraction=0.1, offline_fraction=0.0)
    stack.warm_up(sim)
    run_id = f"drop-{uuid.uuid4().hex[:6]}"

    flow_started = time.monotonic()
    reports = run_flow(
        **_params(
            rounds=rounds,
            devices=devices,
            cohort=cohort,
            over_selection=1.5,
            deadline_s=deadline_s,
        ),
        run_id=run_id,
        local_epochs=local_epochs,
    )
    elapsed = time.monotonic() - flow_started
    summary = sim.finish()

    _rounds_ended(out, reports, rounds)
    out.expect(
        not (late := deadline_overruns(reports, deadline_s, slack_s=2.0)), f"overruns: {late}"
    )
    out.expect(elapsed < rounds * (deadline_s + 25), f"{rounds} rounds took {elapsed:.0f}s")
    out.expect(summary["dropouts"] > 0, "no device dropped out")
    out.expect(summary["stop_reason"] == "done", f"simulator stopped: {summary['stop_reason']}")
    verdict = out.judge(stack, run_id)
    out.expect("committed" in {r.outcome for r in reports}, "no round committed")
    out.expect(verdict.acknowledged > 0, "nothing was acknowledged")
    out.finish(stack, summary, started)
    out.faults["dropout"] = summary["dropouts"]
    out.faults["straggler (slow device)"] = sum(p.speed_class == "slow" for p in sim.profiles)
    out.notes.append(
        f"flow {elapsed:.1f}s; late answers {summary['late']}; devices waited per round "
        f"{[round(r.timings.get('devices', 0.0), 1) for r in reports]} s (deadline {deadline_s:g}s)"
    )
    return out


# ---------------------------------------------------------------- kill -9


def _landed(stack: FaultStack, run_id: str, rnd: int) -> bool:
    return any(
        stack.store.list_keys(updates_prefix(JOB, run_id, rnd, leaf))
        for leaf in ("leaf-0", "leaf-1")
    )


def _leaf_partial_written(stack: FaultStack, run_id: str, rnd: int) -> bool:
    commit = read_commit(stack.store, JOB, run_id)
    if commit is not None and commit.next_round > rnd:
        raise StackError(f"round {rnd} of {run_id} committed before the flow could be killed")
    return any(
        stack.store.head(partial_key(JOB, run_id, rnd, leaf)) for leaf in ("leaf-0", "leaf-1")
    )


def _final_model(stack: FaultStack, run_id: str) -> dict[str, np.ndarray]:
    commit = read_commit(stack.store, JOB, run_id)
    assert commit is not None
    ref = commit.global_model
    data = stack.store.get(ref.key, expected_sha256=ref.sha256).data
    return decode_tensors(data, source=ref.uri)[0]


def kill_gateway_and_flow(
    make: StackMaker,
    *,
    devices: int = 8,
    rounds: int = 3,
    cohort: int = 6,
    deadline_s: float = 30.0,
    seed: int = 3,
) -> Outcome:
    """kill -9 of a gateway mid-round and of the flow mid-aggregation, then resume by run id.

    One fleet (none dropping out), two gateway processes behind taps, and two
    runs of the same job one after the other: ``base`` uninterrupted, in this
    process; ``cut`` with the flow in a subprocess, gateway ``gw-a`` killed as
    soon as round 1's first batch is in S3 (its devices fail over to ``gw-b``),
    the flow killed once the last round's first leaf partial is written (before
    its commit), then the same run id run again here, resuming at that round.

    A round's cohort is a pure function of the registry, the seed and the round
    (``aggregation.cohort``), every device of it reports, and updates are
    deterministic, so the interrupted run must commit the same rounds with the
    same devices as the uninterrupted one, and the same models up to float
    summation order.
    """
    if rounds < 3:
        raise ValueError("the kill scenario needs 3 rounds or more")
    started = time.monotonic()
    out = Outcome("kill -9 gateway + flow, resume", devices=devices, rounds=2 * rounds)
    stack = make(gateways="process")
    flow = stack.flow_process("cut")  # imports while the fleet starts
    sim = stack.simulate(
        devices,
        seed=seed,
        dropout=0.0,
        slow_fraction=0.0,
        offline_fraction=0.0,
        no_until_done=True,
        max_seconds=400,
    )
    stack.warm_up(sim)
    base, cut = f"base-{uuid.uuid4().hex[:6]}", f"cut-{uuid.uuid4().hex[:6]}"
    params = {
        **_params(
            rounds=rounds, devices=devices, cohort=cohort, over_selection=1.0, deadline_s=deadline_s
        ),
        "partition": {"kind": "iid"},
    }
    last = rounds - 1

    # 1. The uninterrupted run.
    base_reports = run_flow(**params, run_id=base)

    # 2. The same run, with a gateway killed mid-round and the flow killed mid-aggregation.
    flow.launch({**params, "run_id": cut})
    wait_for(lambda: _landed(stack, cut, 1), 120, "round 1's first batch", poll=0.02)
    stack.gateways[0].kill()  # type: ignore[union-attr]
    out.faults["kill -9 gateway"] += 1
    wait_for(
        lambda: _leaf_partial_written(stack, cut, last), 120, f"round {last}'s leaf partial", 0.02
    )
    flow.kill()
    out.faults["kill -9 flow"] += 1
    commit = read_commit(stack.store, JOB, cut)
    out.expect(
        commit is not None and commit.next_round == last,
        f"round {last} was committed before the kill ({commit and commit.next_round})",
    )

    # 3. Resume by run id: the last round is redone, the others are not.
    resumed = run_flow(**params, run_id=cut)
    summary = sim.stop()

    _rounds_ended(out, resumed, rounds)
    out.expect(
        [r.outcome for r in resumed] == [r.outcome for r in base_reports] == ["committed"] * rounds,
        f"outcomes: base {[r.outcome for r in base_reports]}, cut {[r.outcome for r in resumed]}",
    )
    out.expect(
        [r.devices_reported for r in resumed] == [r.devices_reported for r in base_reports],
        "the interrupted run aggregated other device counts than the uninterrupted one",
    )
    out.expect(
        resumed[last].flow_run_id != resumed[last - 1].flow_run_id,
        f"round {last} did not come from the resumed run",
    )
    out.expect(
        not (late := deadline_overruns(resumed, deadline_s, slack_s=3.0)), f"overruns: {late}"
    )
    for run_id in (base, cut):
        out.judge(stack, run_id)
    base_account, cut_account = (account_run(stack.store, JOB, r) for r in (base, cut))
    out.expect(
        cut_account.committed == base_account.committed,
        "the interrupted run committed other rounds or devices than the uninterrupted one",
    )
    out.expect(bool(stack.ledger.acknowledged(cut)), "nothing of the cut run was acknowledged")
    out.expect(summary["failovers"] > 0, "no device failed over from the killed gateway")
    models = [_final_model(stack, r) for r in (base, cut)]
    same = all(np.allclose(models[1][n], models[0][n], rtol=1e-6, atol=1e-7) for n in models[0])
    out.expect(same, "the resumed run's model differs from the uninterrupted one's")
    identical = all(np.array_equal(models[0][n], models[1][n]) for n in models[0])
    out.finish(stack, summary, started)
    out.notes.append(
        f"failovers {summary['failovers']}; final models "
        f"{'bit-identical' if identical else 'equal up to float summation order'}"
    )
    return out


# ---------------------------------------------------------------- S3 faults


def s3_faults(
    make: StackMaker,
    *,
    devices: int = 12,
    rounds: int = 3,
    cohort: int = 8,
    deadline_s: float = 25.0,
    rate: float = 0.10,
    seed: int = 5,
) -> Outcome:
    """S3 misbehaving under the gateways and the flow: retried, nothing lost or doubled.

    Gateways and the flow each reach moto through their own ``FaultyProxy``;
    ``rate`` of their requests get a 500, a 503 ``SlowDown``, a 300 ms delay,
    a reset before the request reached S3, a reset after S3 applied it (the
    client retries a PUT that already happened), or an answer cut halfway
    through its body. boto3's retries and ``S3ObjectStore.get``'s own (for a
    cut download) absorb them (``infra/store.py``); a gateway answers ``503`` when a batch
    write still fails, and the device uploads again. A batch whose write (or
    whose close-fence read) is slowed past the round's close is answered
    ``409 late`` although the leaf may still sum it: aggregated without an
    acknowledgement is allowed, an acknowledgement without aggregation is not.
    """
    started = time.monotonic()
    out = Outcome(f"S3 faults {rate:.0%} (gateways + flow)", devices=devices, rounds=rounds)
    plan = FaultPlan(rate=rate, kinds=S3_MIX, delay_s=0.3, seed=seed)
    stack = make(s3_plan=plan)
    sim = stack.simulate(devices, seed=seed, dropout=0.0, slow_fraction=0.0, offline_fraction=0.0)
    stack.warm_up(sim)
    run_id = f"s3f-{uuid.uuid4().hex[:6]}"
    reports = run_flow(
        **_params(
            rounds=rounds,
            devices=devices,
            cohort=cohort,
            over_selection=1.25,
            deadline_s=deadline_s,
        ),
        run_id=run_id,
    )
    summary = sim.finish()

    gateways, flow = (stack.s3_proxies[side].stats() for side in ("gateways", "flow"))
    out.expect(gateways.injected_total > 0, "no S3 fault reached the gateways")
    out.expect(flow.injected_total > 0, "no S3 fault reached the flow")
    kinds = set(gateways.by_kind() + flow.by_kind())
    out.expect(kinds == set(S3_MIX), f"fault kinds injected: {sorted(kinds)}")
    _rounds_ended(out, reports, rounds)
    out.expect(
        all(r.outcome == "committed" for r in reports),
        f"not every round committed: {[r.reason for r in reports]}",
    )
    out.expect(
        not (late := deadline_overruns(reports, deadline_s, slack_s=5.0)), f"overruns: {late}"
    )
    verdict = out.judge(stack, run_id)
    out.expect(verdict.acknowledged > 0, "nothing was acknowledged")
    out.expect(
        verdict.aggregated >= sum(r.devices_reported for r in reports),
        "the reports count more devices than the lineage holds",
    )
    out.finish(stack, summary, started)
    out.faults.update({f"S3 {k}": n for k, n in (gateways.by_kind() + flow.by_kind()).items()})
    out.notes.append(
        f"S3 requests: gateways {gateways.requests_total} ({gateways.injected_total} faulted), "
        f"flow {flow.requests_total} ({flow.injected_total} faulted); "
        f"aggregated without an ack {verdict.aggregated_unacked}"
    )
    return out


# ---------------------------------------------------------------- Prefect server restart


def prefect_restart(
    make: StackMaker,
    server: PrefectServer,
    *,
    devices: int = 8,
    rounds: int = 3,
    cohort: int = 6,
    deadline_s: float = 30.0,
    seed: int = 9,
) -> Outcome:
    """The Prefect server restarted mid-round: the run finishes or fails clearly, and resumes.

    ``server`` must be a server nobody else needs meanwhile. The flow runs in a
    subprocess against it. Once round 1 is open, the server gets SIGTERM and is
    started again on the same port with the same database. Prefect's client
    retries its API calls, so the flow may ride the outage out; if it does not,
    it must exit with an error rather than hang. Either way the same run id is
    then run again: it resumes from the last commit in S3 and applies no round
    twice.
    """
    started = time.monotonic()
    out = Outcome("Prefect server restarted mid-round", devices=devices, rounds=rounds)
    stack = make()
    first = stack.flow_process("first", PREFECT_API_URL=server.url)
    again = stack.flow_process("again", PREFECT_API_URL=server.url)
    sim: Simulator = stack.simulate(
        devices, seed=seed, dropout=0.0, slow_fraction=0.0, offline_fraction=0.0, max_seconds=300
    )
    stack.warm_up(sim)
    run_id = f"restart-{uuid.uuid4().hex[:6]}"
    params = {
        **_params(
            rounds=rounds, devices=devices, cohort=cohort, over_selection=1.0, deadline_s=deadline_s
        ),
        "partition": {"kind": "iid"},
        "run_id": run_id,
    }

    # Round 1 opens; the server goes away and comes back on the same port and database.
    first.launch(params)
    wait_for(lambda: round_open(stack.active(), run_id, 1), 150, "round 1 to open", 0.05)
    stopped = time.monotonic()
    server.stop()
    server.start()
    outage = time.monotonic() - stopped
    out.faults["Prefect server restart"] += 1
    code = first.wait(timeout=240)  # finished, or failed: not hung
    if code != 0:
        tail = first.tail()
        out.expect("Traceback" in tail or "Error" in tail, f"the flow exited {code} silently")
    after_first = read_commit(stack.store, JOB, run_id)

    # The same run id again: it resumes from commit.json and applies no round twice.
    again.launch(params)
    out.expect(again.wait(timeout=240) == 0, f"the resumed flow failed: {again.tail()}")
    summary = sim.finish()

    commit = read_commit(stack.store, JOB, run_id)
    out.expect(commit is not None and commit.next_round == rounds, "the run did not finish")
    if commit is not None:
        reports = read_reports(stack.store, commit)
        _rounds_ended(out, reports, rounds)
        out.expect(all(r.outcome == "committed" for r in reports), "not every round committed")
        out.expect(
            not (late := deadline_overruns(reports, deadline_s, slack_s=3.0)), f"overruns: {late}"
        )
        if after_first is not None:  # what the first run committed was kept, not redone
            out.expect(
                commit.reports[: len(after_first.reports)] == after_first.reports,
                "a round the first flow committed was redone",
            )
    for rnd in range(rounds):
        out.expect(
            stack.store.head(partial_key(JOB, run_id, rnd, "root")) is not None,
            f"round {rnd} has no root partial",
        )
    out.judge(stack, run_id)
    out.finish(stack, summary, started)
    out.notes.append(
        f"outage {outage:.1f}s; the first flow exited {code} after committing "
        f"{after_first.next_round if after_first else 0} round(s); the second resumed"
    )
    return out
