"""Federated evaluation without the stack: held-out splits, the plan, the devices' numbers,
the batches they travel in, and where the result shows (report, log line, tables)."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from aggregation.evaluation import EvaluationCollector
from aggregation.tensors import encode_tensors
from edge.data.config import DatasetConfig
from edge.data.partition import (
    PartitionScheme,
    device_partition,
    device_split,
    holdout_split,
)
from edge.jobs import get_job
from edge.simulator.training import evaluate_device, train_device
from edge.simulator.work import TrainRequest
from edge.training.evaluate import evaluate
from edge.training.state import initial_state
from edge.update_batch import BatchContext, DeviceUpdate, decode_update_batch, encode_update_batch
from infra.errors import ValidationError
from infra.round_table import RoundTable, metric_line
from infra.run_state import CommitRecord
from tasks.models import held_out_metrics
from tasks.planning import plan_evaluation, plan_round
from tasks.reporting import DEVICE_EVALUATION, build_round_report, phase_timings, round_lines
from tasks.results import DeviceEvaluation
from tasks.ui import summary_markdown
from tests.test_round_story import NOW, _results, params, ref

# --- each simulated device's held-out part ----------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 97])
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5])
def test_a_holdout_split_is_disjoint_seeded_and_leaves_something_to_train(
    n: int, fraction: float
) -> None:
    indices = np.arange(100, 100 + n)

    train, held = holdout_split(indices, fraction, seed=3, device_index=5)

    assert sorted([*train, *held]) == list(indices)  # disjoint, covering
    assert list(train) == sorted(train) and list(held) == sorted(held)
    if fraction == 0.0 or n < 2:
        assert held.size == 0
    else:
        assert 1 <= held.size <= n - 1 and held.size == min(n - 1, max(1, round(n * fraction)))
    again = holdout_split(indices, fraction, seed=3, device_index=5)
    assert np.array_equal(again[1], held)
    if n >= 10 and fraction:
        assert not np.array_equal(holdout_split(indices, fraction, 3, 6)[1], held)


def test_without_a_holdout_a_device_trains_on_its_whole_partition() -> None:
    job = get_job("hello-mobile")
    data = job.dataset(DatasetConfig(), store=None)
    scheme = PartitionScheme(kind="iid")

    (x, y), (xh, _) = device_split(data, scheme, 2, 8, 0, holdout=0.0)
    (x2, _), (xh2, _) = device_split(data, scheme, 2, 8, 0, holdout=0.25)

    whole = device_partition(data, scheme, 2, 8, 0)
    assert np.array_equal(x, whole[0]) and np.array_equal(y, whole[1]) and xh.shape[0] == 0
    assert x2.shape[0] + xh2.shape[0] == x.shape[0] and xh2.shape[0] == round(x.shape[0] / 4)
    assert not {r.tobytes() for r in x2} & {r.tobytes() for r in xh2}


# --- the plan ---------------------------------------------------------------------------


def test_an_evaluation_plan_asks_its_own_cohort_for_metrics_on_the_new_model() -> None:
    devices = [f"dev-{i:03d}" for i in range(40)]
    leaves = ["leaf-0", "leaf-1"]
    model = ref("hello-mobile/default/round-00004/global.safetensors")
    run = params(eval_every=2, eval_cohort_size=3, over_selection=1.5)
    job = get_job("hello-mobile")

    plan = plan_evaluation(
        run,
        job,
        rnd=3,
        devices=devices,
        leaves=leaves,
        global_model=model,
        tensor_spec={"vector": ([256], "float32")},
        now=NOW,
        max_num_samples=80,
    )
    training = plan_round(
        run,
        job,
        rnd=3,
        devices=devices,
        leaves=leaves,
        global_model=model,
        program=None,
        tensor_spec={"vector": ([256], "float32")},
        now=NOW,
    )

    assert plan.active.kind == "evaluate" and plan.active.round == 3
    assert plan.active.leaf_manifest_keys["leaf-0"].endswith(
        "round-00003/device-evaluation/tasks/leaf-0.json"
    )
    assert plan.selected == 5 and plan.target == 3  # ceil(3 x 1.5) asked, 3 close it
    chosen = {d for t in plan.tasks.values() for d in t.selected_device_ids}
    trained = {d for t in training.tasks.values() for d in t.selected_device_ids}
    assert chosen != trained  # drawn independently of the round's training cohort
    for task in plan.tasks.values():
        assert task.kind == "evaluate" and task.metrics == ["loss", "accuracy"]
        assert task.program is None and task.model_version == model.sha256
        assert ".eval." in task.task_id and task.max_num_samples == 80
        assert task.data_hint is not None and task.data_hint.holdout == 0.2
    # training tasks of the same run hold the same fraction out (never trained on)
    assert all(t.data_hint and t.data_hint.holdout == 0.2 for t in training.tasks.values())
    assert plan.deadline == NOW + timedelta(seconds=run.round_deadline_s)


def test_rounds_evaluate_on_devices_every_k_rounds_and_only_then_hold_data_out() -> None:
    assert [r for r in range(7) if params(eval_every=3).evaluates_on_devices(r)] == [2, 5]
    assert not any(params().evaluates_on_devices(r) for r in range(7))
    assert params().holdout == 0.0 and params(eval_every=1, eval_holdout=0.3).holdout == 0.3
    assert params(eval_every=1).evaluation_cohort == 4  # the cohort_size by default
    with pytest.raises(ValueError):
        params(eval_every=0)


# --- the devices' numbers ---------------------------------------------------------------

METERS = """
import numpy as np
from torch import nn
from torch.nn import functional as F

from edge.data import Dataset, DatasetConfig, PartitionScheme
from edge.jobs import JobSpec, TrainHyperparams


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def meters(config: DatasetConfig, *, store=None) -> Dataset:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = np.stack([x[:, 0] - x[:, 1], 2 * x[:, 2]], 1).astype(np.float32)
    return Dataset("generated-meters", True, x, y, x[:0], y[:0], num_classes=0)


METERS = JobSpec(
    name="meters-eval", description="two readings", input_shape=(4,), task="regression",
    target_shape=(2,), dataset=meters, model=Linear, loss=F.mse_loss,
    hyperparams=TrainHyperparams(batch_size=8, max_steps=4), partition=PartitionScheme(kind="iid"),
)
"""


def _hint(num_devices: int, holdout: float, scheme: str) -> dict[str, object]:
    return {"scheme": scheme, "num_devices": num_devices, "seed": 1, "holdout": holdout}


@pytest.mark.parametrize("job_ref", ["hello-mobile", "xor-mobile", "meters"])
def test_devices_evaluations_add_up_to_the_servers_evaluation_of_the_same_examples(
    job_ref: str, tmp_path: Path
) -> None:
    # Prepare: a model state, and each device's request as an evaluate task sends it
    if job_ref == "meters":
        path = tmp_path / "meters_job.py"
        path.write_text(textwrap.dedent(METERS))
        job_ref = f"{path}:METERS"
    job = get_job(job_ref)
    scheme = job.partition.kind
    state = initial_state(job, seed=4)
    if job.closed_form is not None:  # a vector near some of the points: accuracy not 0
        state = {"vector": job.dataset(DatasetConfig()).x_train[:3].mean(0)}
    devices, holdout = 10, 0.3
    hint = _hint(devices, holdout, scheme)
    weights = encode_tensors(state)

    # Execute: every device evaluates its held-out data; a leaf adds the results
    replies = [
        evaluate_device(TrainRequest(job_ref, "executorch", i, weights, data_hint=hint))
        for i in range(devices)
    ]
    leaf = EvaluationCollector("t", "m", frozenset(map(str, range(devices))), job.metric_names)
    for i, reply in enumerate(replies):
        leaf.offer(
            device_id=str(i),
            task_id="t",
            model_version="m",
            num_samples=reply.num_samples,
            metrics=reply.metrics,
        )

    # Assert: the same numbers as the server's evaluation of all those examples at once
    data = job.dataset(DatasetConfig.model_validate(job.default_dataset.model_dump()))
    held = [device_split(data, job.partition, i, devices, 1, holdout)[1] for i in range(devices)]
    x, y = np.concatenate([h[0] for h in held]), np.concatenate([h[1] for h in held])
    server = evaluate(job, state, x, y)
    assert leaf.result().samples == x.shape[0] and leaf.reported == set(map(str, range(devices)))
    assert set(server) == set(job.metric_names)
    assert leaf.result().means() == pytest.approx(server, rel=1e-5, abs=1e-7)


def test_a_device_never_trains_on_its_held_out_examples() -> None:
    weights = encode_tensors(initial_state(get_job("hello-mobile"), seed=0))
    hint = _hint(4, 0.25, "iid")

    trained = train_device(TrainRequest("hello-mobile", "pytorch", 1, weights, data_hint=hint))
    evaluated = evaluate_device(TrainRequest("hello-mobile", "pytorch", 1, weights, data_hint=hint))
    whole = train_device(
        TrainRequest("hello-mobile", "pytorch", 1, weights, data_hint=_hint(4, 0, "iid"))
    )

    assert trained.num_samples + evaluated.num_samples == whole.num_samples
    assert evaluated.num_samples == round(whole.num_samples * 0.25)
    assert set(evaluated.metrics) == {"loss", "accuracy"}


def test_a_job_without_a_test_split_has_no_server_metric(tmp_path: Path) -> None:
    path = tmp_path / "meters_job.py"
    path.write_text(textwrap.dedent(METERS))
    job = get_job(f"{path}:METERS")
    data = job.dataset(DatasetConfig())
    x, y = data.split_arrays("test")

    assert held_out_metrics(job, initial_state(job, 0), x, y, limit=1000) == ({}, 0)
    metrics, n = held_out_metrics(job, initial_state(job, 0), data.x_train, data.y_train, 50)
    assert n == 50 and set(metrics) == {"loss", "mse", "mae"}


# --- the batches results travel in ------------------------------------------------------


def test_evaluation_results_travel_as_batches_without_tensors() -> None:
    context = BatchContext("j", "r", 3, "leaf-0", "gw", "evaluate")
    result = DeviceUpdate(
        device_id="d1",
        task_id="j.r.r00003.eval.leaf-0",
        model_version="m",
        num_samples=12,
        tensors={},
        metrics={"loss": 0.3, "accuracy": 0.5},
        received_at=datetime(2026, 1, 1, tzinfo=UTC),
        gateway_id="gw",
    )
    update = DeviceUpdate("d1", "t", "m", 12, {"w": np.ones(2, np.float32)})

    [decoded] = decode_update_batch(encode_update_batch([result], context), "s3://b/k")

    assert decoded == result
    with pytest.raises(ValueError, match="carries tensors"):
        encode_update_batch([update], context)
    with pytest.raises(ValueError, match="has no tensors"):
        encode_update_batch([result], BatchContext("j", "r", 3, "leaf-0", "gw"))
    empty = encode_update_batch([result], context).replace(b'"evaluate"', b'"train"   ')
    with pytest.raises(ValidationError, match="has no tensors"):
        decode_update_batch(empty, "s3://b/k")


# --- where the result shows -------------------------------------------------------------


def _device_evaluation() -> DeviceEvaluation:
    return DeviceEvaluation(
        metrics={"loss": 0.35, "accuracy": 0.8125},
        devices=5,
        samples=160,
        selected=6,
        rejected={},
        ref=ref("device-eval"),
        started_at=1006.25,
        finished_at=1009.0,
    )


def test_the_report_shows_the_devices_metrics_beside_the_servers() -> None:
    results = _results().model_copy(update={"device_evaluation": _device_evaluation()})

    report = build_round_report(
        results,
        commit=CommitRecord(
            job="hello-mobile", run_id="r", next_round=2, global_model=ref("g2"), updated_at=NOW
        ),
        late=0,
        min_reports=2,
        flow_run_id=None,
        now=1009.5,
    )

    assert report.test_metrics == {"loss": 0.4, "accuracy": 0.8}
    assert report.device_metrics == {"loss": 0.35, "accuracy": 0.8125}
    assert (report.devices_evaluated, report.device_eval_samples) == (5, 160)
    assert phase_timings(results)[DEVICE_EVALUATION] == 2.75
    assert DEVICE_EVALUATION not in phase_timings(_results())
    assert metric_line(report) == (
        "test accuracy 80.0%, loss 0.4000; devices accuracy 81.2%, loss 0.3500 (5 evaluated)"
    )
    [line] = round_lines([report])
    assert "test accuracy  80.0%" in line and "devices accuracy 81.2% (5 evaluated)" in line
    plain = report.model_copy(update={"device_metrics": {}, "devices_evaluated": 0})

    table = RoundTable([report, plain], title="t")
    console = Console(width=160, record=True, color_system=None)
    console.print(table)
    text = console.export_text()
    assert "device" in text and "81.2%" in text and "device acc" in text
    assert "test acc" in text and "80.0%" in text
    markdown = summary_markdown("hello-mobile", "r", [report, plain])
    assert "devices accuracy" in markdown and "accuracy 81.25%, loss 0.3500" in markdown
