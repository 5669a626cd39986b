"""The round's pure core: planning, the close policy, phase timings and the report."""

from __future__ import annotations

import asyncio
import inspect
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from aggregation.clipping import ROUND_CLIP_REASON, AdaptiveNormBound, NormBoundState
from aggregation.partial import PartialAggregate
from edge.jobs import get_job
from edge.routing import leaf_for_device
from flows.federated import federated_training
from infra import keys
from infra.lineage import read_lineage
from infra.run_state import CommitRecord
from infra.settings import GatewaySettings, S3Settings
from infra.store import MemoryObjectStore, ObjectRef
from tasks.collect import bounded_leaf, check_leaves
from tasks.context import RunContext
from tasks.dispatch import device_weight_cap
from tasks.models import run_dataset
from tasks.params import TrainingParams
from tasks.planning import ClosePolicy, OpenedRound, client_hyperparams, plan_round
from tasks.reporting import PHASES, advance, build_round_report, next_commit, phase_timings
from tasks.results import (
    Closing,
    Evaluation,
    LeafLevel,
    LeafOutcome,
    ProgramExport,
    RootResult,
    RoundResults,
)
from tests.support.outcomes import stored_leaf

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def ref(key: str, size: int = 100) -> ObjectRef:
    return ObjectRef(bucket="b", key=key, sha256=(key.encode().hex() * 64)[:64], size=size)


def params(**kw: object) -> TrainingParams:
    return TrainingParams.model_validate({"job": "hello-mobile", "cohort_size": 4, **kw})


def test_close_policy_closes_on_reports_or_deadline_and_never_waits_for_nobody() -> None:
    policy = ClosePolicy(target=3, deadline=NOW)
    before = NOW - timedelta(seconds=5)
    assert policy.reason_to_close(2, before) is None
    assert policy.reason_to_close(3, before) == "enough-reports"
    assert policy.reason_to_close(0, NOW) == "deadline"
    assert policy.seconds_left(before) == 5.0 and policy.seconds_left(NOW + timedelta(1)) == 0.0
    assert ClosePolicy(target=0, deadline=NOW + timedelta(hours=1)).reason_to_close(0, before)


def test_plan_round_routes_the_cohort_and_points_at_every_leaf() -> None:
    devices = [f"dev-{i:03d}" for i in range(40)]
    leaves = ["leaf-0", "leaf-1", "leaf-2"]
    model = ref("hello-mobile/default/round-00003/global.safetensors")
    plan = plan_round(
        params(over_selection=1.5, round_deadline_s=30),
        get_job("hello-mobile"),
        rnd=3,
        devices=devices,
        leaves=leaves,
        global_model=model,
        program=None,
        tensor_spec={"w": ([2], "float32")},
        now=NOW,
    )
    assert plan.selected == 6 and plan.target == 4 and plan.registered == 40
    assert plan.deadline == NOW + timedelta(seconds=30)
    assert set(plan.tasks) == set(leaves) == set(plan.active.leaves)
    chosen = [d for t in plan.tasks.values() for d in t.selected_device_ids]
    assert len(chosen) == 6 and set(chosen) <= set(devices)
    for leaf, task in plan.tasks.items():
        assert all(leaf_for_device(d, leaves) == leaf for d in task.selected_device_ids)
        assert task.model_version == model.sha256 and task.round == 3
        assert task.hyperparams["seed"] == 3  # seed 0 * 100_003 + round
    assert plan.active.status == "open" and plan.active.round == 3
    assert plan.active.leaf_manifest_keys["leaf-1"].endswith("round-00003/tasks/leaf-1.json")
    # the same registry, seed and round give the same plan (a resumed run asks the same devices)
    again = plan_round(
        params(over_selection=1.5, round_deadline_s=30),
        get_job("hello-mobile"),
        rnd=3,
        devices=list(reversed(devices)),
        leaves=leaves,
        global_model=model,
        program=None,
        tensor_spec={"w": ([2], "float32")},
        now=NOW,
    )
    assert again.tasks == plan.tasks


def _results(committed: bool = True) -> RoundResults:
    t0 = 1000.0
    leaf = LeafOutcome(
        leaf="leaf-0",
        partial=ref("p0"),
        reported=3,
        rejected={"non-finite": 1},
        rejection_examples={},
        clipped={"adaptive-norm": 1},
        duplicates=2,
        batches=2,
        bytes_in=500,
        finished_at=t0 + 6.0,
    )
    other = leaf.model_copy(
        update={"leaf": "leaf-1", "rejected": {"non-finite": 2, "stale-model": 1}, "duplicates": 0}
    )
    return RoundResults(
        program=ProgramExport(
            ref=ref("prog", 1000),
            method="template-weights-patched",
            started_at=t0,
            finished_at=t0 + 1,
        ),
        opened=OpenedRound(
            round=2,
            task_refs={"leaf-0": ref("t0"), "leaf-1": ref("t1")},
            active=plan_round(
                params(),
                get_job("hello-mobile"),
                rnd=2,
                devices=["a"],
                leaves=["leaf-0", "leaf-1"],
                global_model=ref("g"),
                program=None,
                tensor_spec={"w": ([1], "float32")},
                now=NOW,
            ).active,
            selected=8,
            registered=40,
            target=6,
            deadline=NOW,
            norm_state=NormBoundState(),
            started_at=t0 + 1.0,
            finished_at=t0 + 1.5,
        ),
        level=LeafLevel(
            closing=Closing(reason="enough-reports", reports_seen=6, closed_at=t0 + 5.0),
            leaves=[leaf, other],
        ),
        root=RootResult(
            devices=6 if committed else 1,
            weight=60.0,
            train_metrics={"loss": 0.5, "accuracy": 0.75} if committed else {},
            global_model=ref("g3", 200) if committed else None,
            root_partial=ref("root"),
            median_norm=0.5 if committed else None,
            norm_state=NormBoundState(estimate=0.5, rounds=1) if committed else None,
            finished_at=t0 + 6.25,
        ),
        evaluation=Evaluation(
            metrics={"loss": 0.4, "accuracy": 0.8},
            dataset="synthetic",
            samples=100,
            ref=ref("eval"),
            started_at=t0 + 6.25,
            finished_at=t0 + 7.0,
        )
        if committed
        else None,
    )


def test_phase_timings_come_from_the_steps_results() -> None:
    timings = phase_timings(_results())
    assert list(timings) == list(PHASES)
    assert timings == {
        "export": 1.0,
        "dispatch": 0.5,
        "devices": 3.5,
        "close-and-collect": 1.0,
        "aggregate": 0.25,
        "evaluate": 0.75,
    }


def test_round_report_sums_leaves_and_keeps_the_model_of_an_abandoned_round() -> None:
    commit = CommitRecord(
        job="hello-mobile",
        run_id="default",
        next_round=2,
        global_model=ref("g2", 200),
        updated_at=NOW,
    )
    report = build_round_report(
        _results(),
        commit=commit,
        late=3,
        min_reports=2,
        flow_run_id="fr",
        now=1007.5,
    )
    assert report.outcome == "committed" and report.reason == ""
    assert report.rejected == {"non-finite": 3, "stale-model": 1} and report.duplicates == 2
    assert report.clipped == {"adaptive-norm": 2} and report.median_norm == 0.5
    assert report.norm_bound == 4 * 0.5  # the next round's bound: 4x the median estimate
    assert report.devices_reported == 6 and report.devices_selected == 8 and report.late == 3
    assert report.bytes_in == 1000 and report.bytes_out == (200 + 1000) * 6
    assert report.test_accuracy == 0.8 and report.train_loss == 0.5
    assert report.duration_s == pytest.approx(7.5) and report.global_model == ref("g3", 200)
    after = next_commit(commit, report, _results().root, ref("report"))
    assert after.next_round == 3 and after.global_model == ref("g3", 200)
    assert after.reports == [ref("report")]
    assert after.norm_bound == {"estimate": 0.5, "rounds": 1}

    abandoned = build_round_report(
        _results(committed=False),
        commit=commit,
        late=0,
        min_reports=2,
        flow_run_id=None,
        now=1007.0,
    )
    assert abandoned.outcome == "abandoned"
    assert abandoned.reason == "1 report(s), fewer than min_reports=2"
    assert abandoned.global_model == ref("g2", 200) and abandoned.test_accuracy is None
    kept = next_commit(commit, abandoned, _results(False).root, ref("r"))
    assert kept.global_model == commit.global_model and kept.next_round == 3
    assert kept.norm_bound == commit.norm_bound  # an abandoned round leaves the bound alone


def test_the_next_round_starts_from_the_roots_model_before_the_report_exists() -> None:
    commit = CommitRecord(
        job="hello-mobile", run_id="r", next_round=2, global_model=ref("g2", 200), updated_at=NOW
    )
    report = build_round_report(
        _results(), commit=commit, late=0, min_reports=2, flow_run_id=None, now=1007.5
    )
    basis = advance(commit, _results().root)  # what round 3 opens from, before round 2 commits
    after = next_commit(commit, report, _results().root, ref("report"))
    assert basis.model_dump(exclude={"reports", "updated_at"}) == after.model_dump(
        exclude={"reports", "updated_at"}
    )
    assert basis.reports == [] and after.reports == [ref("report")]
    kept = advance(commit, _results(committed=False).root)  # abandoned: same model, same bound
    assert (kept.global_model, kept.norm_bound, kept.next_round) == (ref("g2", 200), None, 3)
    with pytest.raises(ValueError, match="cannot follow"):
        next_commit(basis, report, _results().root, ref("report"))  # round 2 after a commit at 3
    # the marks of each step, for telling overlapping rounds apart
    assert report.marks == {
        "start": 1000.0,
        "opened": 1001.5,
        "closed": 1005.0,
        "collected": 1006.0,
        "model": 1006.25,
        "evaluated": 1007.0,
    }


def test_round_zero_check_bounds_a_leaf_whose_only_update_is_poisoned_and_reports_it() -> None:
    # Prepare: two honest leaves, and one whose only update is 1000x theirs
    store = MemoryObjectStore()
    honest = [stored_leaf(store, "leaf-0", [1.0, 1.2, 1.5]), stored_leaf(store, "leaf-1", [1.1])]
    lone = stored_leaf(store, "leaf-2", [1000.0])
    assert not lone.clipped  # the leaf alone could not judge it
    verdicts = AdaptiveNormBound().check_leaves({o.leaf: o.norm_summary() for o in [*honest, lone]})
    assert list(verdicts) == ["leaf-2"]

    # Execute
    bounded = bounded_leaf(
        store, "hello-mobile", "default", 0, lone, verdicts["leaf-2"], observers=()
    )

    # Assert: the outcome points at the scaled partial, whose update is at the round's bound
    bound = verdicts["leaf-2"].bound
    assert bounded.partial.key == keys.partial_key("hello-mobile", "default", 0, "leaf-2-bounded")
    assert bounded.clipped == {ROUND_CLIP_REASON: 1} and bounded.norm_bound == bound
    partial = PartialAggregate.from_bytes(store.get(bounded.partial.key).data)
    assert partial.count == 1 and partial.norms == lone.norm_summary().norms
    assert float(partial.sums["w"][0]) / partial.weight == pytest.approx(bound, rel=1e-6)
    record = read_lineage(store, bounded.partial.key)
    assert record is not None and [i.uri for i in record.inputs] == [lone.partial.uri]
    assert "level" not in record.parameters  # not a node of the tree: the leaf, bounded
    # and the round report counts it beside the leaves' own clips
    results = _results()
    level = results.level.model_copy(update={"leaves": [*results.level.leaves, bounded]})
    commit = CommitRecord(
        job="hello-mobile", run_id="default", next_round=2, global_model=ref("g2"), updated_at=NOW
    )
    report = build_round_report(
        results.model_copy(update={"level": level}),
        commit=commit,
        late=0,
        min_reports=2,
        flow_run_id=None,
        now=1007.5,
    )
    assert report.clipped == {"adaptive-norm": 2, ROUND_CLIP_REASON: 1}


def test_round_zero_check_reads_and_writes_nothing_in_an_honest_round() -> None:
    store = MemoryObjectStore()
    leaves = [stored_leaf(store, "leaf-0", [1.0, 3.0]), stored_leaf(store, "leaf-1", [2.0])]
    level = LeafLevel(
        closing=Closing(reason="enough-reports", reports_seen=3, closed_at=1000.0), leaves=leaves
    )
    ctx = RunContext(params(), S3Settings(bucket="b"), GatewaySettings())

    assert asyncio.run(check_leaves(ctx, 0, level)) is level


STRATEGY_FILE = """
from aggregation.strategies import Strategy


class HalvingLr(Strategy):
    name = "halving-lr"

    def step(self, param, update, state):
        return param + update, {}

    def configure_round(self, rnd, hyperparams):
        return {"lr": hyperparams["lr"] / 2**rnd}
"""


def test_a_users_strategy_schedules_client_hyperparameters_per_round(tmp_path: Path) -> None:
    path = tmp_path / "my_strategy.py"
    path.write_text(STRATEGY_FILE)
    p = params(strategy={"name": f"{path}:HalvingLr"}, lr=0.4)
    job = get_job("hello-mobile")
    lrs = [client_hyperparams(p, job, rnd)["lr"] for rnd in range(3)]
    assert lrs == [0.4, 0.2, 0.1]
    assert client_hyperparams(p, job, 2)["seed"] == 2
    # a schedule that breaks the job's schema is refused before any device sees it
    negative = tmp_path / "negative_lr.py"
    negative.write_text(STRATEGY_FILE.replace('hyperparams["lr"] / 2**rnd', "-1.0"))
    bad = params(strategy={"name": f"{negative}:HalvingLr"})
    with pytest.raises(ValueError, match="lr"):
        client_hyperparams(bad, job, 1)


def test_the_flow_signature_is_training_params() -> None:
    """Prefect builds the UI form and `-p` parsing from the signature: it must not drift."""
    signature = inspect.signature(federated_training.fn).parameters
    assert list(signature) == list(TrainingParams.model_fields)
    defaults = TrainingParams.model_construct(job="")
    for name, p in signature.items():
        if name != "job":
            assert p.default == getattr(defaults, name), name


def test_a_devices_weight_is_capped_at_the_largest_partition_unless_the_run_sets_it() -> None:
    store = MemoryObjectStore()
    settings = (S3Settings(bucket="b"), GatewaySettings())
    iid = RunContext(params(num_devices=8, partition={"kind": "iid"}), *settings)
    data = run_dataset(iid, store)
    n = data.y_train.shape[0]
    assert device_weight_cap(iid, store) == -(-n // 8)  # the largest of 8 near-equal parts
    skewed = RunContext(
        params(num_devices=8, partition={"kind": "dirichlet", "alpha": 0.1}), *settings
    )
    assert device_weight_cap(iid, store) < device_weight_cap(skewed, store) <= n
    fixed = RunContext(params(max_device_samples=50), *settings)
    assert device_weight_cap(fixed, store) == 50
