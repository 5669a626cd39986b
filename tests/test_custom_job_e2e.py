"""A user's own job, defined in one file outside Canopy, through the real stack.

A real Prefect server (SQLite), a moto S3 server over HTTP, two gateway workers
and the device simulator in its own process, started with the job's *file
reference* exactly as a user would (``--job /tmp/.../sides_job.py:SIDES``).
Each job is written to a temporary file with generated data, so the test owns
every line of it: a classification job whose phones each hold one owner's
points (a natural partition) on ExecuTorch devices, and a regression job on
PyTorch devices. Bad jobs must fail before the first round, say which job and
field is wrong and how to fix it, and leave the bucket empty.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from infra.lineage import LineageNode, LineageRecord, walk_lineage
from infra.run_state import read_commit
from tests.support.stack import ALWAYS_ON, LocalStack, Simulator, run_flow, small_run

pytestmark = pytest.mark.slow

# Which side of a line a point lies on. Each of 12 owners draws points around its
# own centre, so every phone's data is differently distributed (non-IID).
SIDES_JOB = '''
"""sides-e2e: which side of a line a point lies on; 12 owners, each its own region."""

import numpy as np
from torch import nn

from edge.data import Dataset, DatasetConfig, PartitionScheme
from edge.jobs import JobSpec, TrainHyperparams

OWNERS = 12


def sides(config: DatasetConfig, *, store=None) -> Dataset:
    rng = np.random.default_rng([config.seed, 7])
    centre = rng.normal(0.0, 1.5, (OWNERS, 2))
    counts = rng.integers(24, 48, OWNERS)

    def draw(n):
        owners = np.repeat(np.arange(OWNERS), n)
        x = (centre[owners] + rng.normal(0.0, 1.0, (owners.size, 2))).astype(np.float32)
        return x, (x[:, 0] - 0.5 * x[:, 1] > 0.3).astype(np.int64), owners

    x, y, owners = draw(counts)
    x_test, y_test, test_owners = draw(counts // 2)
    return Dataset(
        "generated-sides", True, x, y, x_test, y_test, num_classes=2,
        train_owners=owners, test_owners=test_owners,
    )


def _model():
    return MODEL()


MODEL = lambda: nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))

SIDES = JobSpec(
    name="sides-e2e",
    description="Which side of a line; one owner's points per device.",
    input_shape=INPUT_SHAPE,
    num_classes=2,
    dataset=sides,
    model=_model,
    hyperparams=TrainHyperparams(local_epochs=1, max_steps=8, batch_size=8, lr=0.1, momentum=0.5),
    partition=PartitionScheme(kind="natural", min_size=8),
)
'''

# A reading that is linear in four features, plus noise: MSE can fall to ~0.01.
METERS_JOB = '''
"""meters-e2e: a reading from four features (regression), generated data."""

import numpy as np
from torch import nn
from torch.nn import functional as F

from edge.data import Dataset, DatasetConfig, PartitionScheme
from edge.jobs import JobSpec, TrainHyperparams

WEIGHTS = np.array([1.5, -2.0, 0.5, 1.0], dtype=np.float32)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(x).squeeze(-1)  # (B,): one value per example


def meters(config: DatasetConfig, *, store=None) -> Dataset:
    rng = np.random.default_rng([config.seed, 11])

    def draw(n):
        x = rng.normal(0.0, 1.0, (n, 4)).astype(np.float32)
        y = (x @ WEIGHTS + 0.5 + rng.normal(0.0, 0.1, n)).astype(np.float32)
        return x, y

    x, y = draw(480)
    x_test, y_test = draw(200)
    return Dataset("generated-meters", True, x, y, x_test, y_test, num_classes=0)


METERS = JobSpec(
    name="meters-e2e",
    description="Linear regression of a reading on four features.",
    input_shape=(4,),
    task="regression",
    dataset=meters,
    model=Linear,
    loss=F.mse_loss,
    hyperparams=TrainHyperparams(local_epochs=1, max_steps=8, batch_size=8, lr=0.05),
    partition=PartitionScheme(kind="iid"),
)
'''


def sides_source(*, input_shape: str = "(2,)", model: str | None = None) -> str:
    """The sides job's file, optionally broken: another ``input_shape`` or model."""
    source = SIDES_JOB.replace("INPUT_SHAPE", input_shape)
    if model is not None:
        source = source.replace(
            "MODEL = lambda: nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))",
            f"MODEL = lambda: {model}",
        )
    return textwrap.dedent(source)


def write_job(stack: LocalStack, filename: str, source: str) -> Path:
    path = stack.tmp / filename
    path.write_text(source)
    return path


def simulate(stack: LocalStack, job: str, runtime: str) -> Simulator:
    """The device simulator as a user starts it, with the job's file reference."""
    return stack.simulate(job, 6, runtime=runtime, **ALWAYS_ON)


def records(node: LineageNode) -> dict[str, LineageRecord]:
    """Every lineage record in the ancestry of ``node``, by the object it produced
    (an object reached twice, such as the initial model, is counted once)."""
    found = {node.uri: node.record} if node.record is not None else {}
    for parent in node.parents:
        found.update(records(parent))
    return found


# What every run here shares, over tests.support.stack.SMALL_RUN.
FLOW = {"cohort_size": 4, "min_reports": 3, "registry_wait_s": 60, "num_devices": 6}


def test_a_job_file_with_a_natural_partition_trains_on_executorch_devices(
    local_stack: LocalStack,
) -> None:
    # Prepare: the job in a file of its own, and phones that know only its reference
    stack = local_stack
    path = write_job(stack, "sides_job.py", sides_source())
    reference = f"{path}:SIDES"
    run_id = f"sides-{uuid.uuid4().hex[:6]}"
    sim = simulate(stack, reference, "executorch")

    # Execute: three rounds, each phone holding one owner's points
    reports = run_flow(
        **small_run(
            **FLOW,
            job=reference,
            run_id=run_id,
            runtime="executorch",
            rounds=3,
            partition={"kind": "natural", "min_size": 8},
        )
    )
    summary = sim.finish()

    # Assert: every round trained the ExecuTorch program and accuracy rose
    assert [r.outcome for r in reports] == ["committed"] * 3
    assert all(r.program is not None for r in reports)
    accuracy = [r.test_metrics["accuracy"] for r in reports]
    print(f"sides-e2e test accuracy by round: {accuracy}")
    assert accuracy[-1] >= accuracy[0] + 0.05 and accuracy[-1] >= 0.7, accuracy
    assert set(reports[-1].test_metrics) == {"accuracy", "loss"}
    # Keys, gateways and the simulator all used the job's declared name
    commit = read_commit(stack.store, "sides-e2e", run_id)
    assert commit is not None and commit.next_round == 3
    assert summary["stop_reason"] == "done"
    # Devices held one owner each: six partitions of different sizes
    assert len(set(summary["samples_by_device"].values())) > 1

    # The final model's lineage names the job file and its sha256
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    found = records(walk_lineage(stack.store, reports[-1].global_model.uri)).values()
    initial = [r for r in found if r.kind == "initial-model"]
    exports = [r for r in found if r.kind == "executorch-export"]
    assert len(initial) == 1 and len(exports) >= 3  # the template, then one per round
    for record in (*initial, *exports):
        assert record.parameters["job_reference"] == reference
        assert record.parameters["job_file"] == str(path.resolve())
        assert record.parameters["job_file_sha256"] == digest


def test_a_regression_job_file_trains_on_pytorch_devices_and_its_mse_falls(
    local_stack: LocalStack,
) -> None:
    stack = local_stack
    path = write_job(stack, "meters_job.py", textwrap.dedent(METERS_JOB))
    reference = f"{path}:METERS"
    sim = simulate(stack, reference, "pytorch")

    run_id = f"meters-{uuid.uuid4().hex[:6]}"
    reports = run_flow(**small_run(**FLOW, job=reference, run_id=run_id, runtime="pytorch"))
    sim.finish()

    assert [r.outcome for r in reports] == ["committed"] * 3
    mse = [r.test_metrics["mse"] for r in reports]
    print(f"meters-e2e test mse by round: {mse}")
    assert mse[0] > mse[1] > mse[2] and mse[2] < 0.5, mse
    assert set(reports[-1].test_metrics) == {"loss", "mse", "mae"}
    assert set(reports[-1].train_metrics) >= {"mse", "mae"}
    assert reports[-1].test_accuracy is None  # no accuracy is made up for regression


BUFFERS = "nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))"
THREE_INPUTS = "nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))"


@pytest.mark.parametrize(
    ("case", "job", "overrides", "expected"),
    [
        (
            "missing file",
            "{tmp}/no_such_job.py:SIDES",
            {},
            [r"job '.*no_such_job\.py:SIDES'", "does not exist", "path/to/file.py:ATTR"],
        ),
        (
            "missing attribute",
            "{tmp}/sides_job.py:SIDE",
            {},
            [r"job '.*sides_job\.py:SIDE'", "has no attribute 'SIDE'", "package.module:ATTR"],
        ),
        (
            "model with buffers",
            "{tmp}/buffers_job.py:SIDES",
            {},
            ["job sides-e2e", "buffers", "GroupNorm"],
        ),
        (
            "data shape is not input_shape",
            "{tmp}/shape_job.py:SIDES",
            {},
            [
                r"job sides-e2e: dataset generated-sides",
                r"input_shape is \(3,\)",
                r"set input_shape=\(2,\)",
            ],
        ),
        (
            "fewer owners than devices",
            "{tmp}/sides_job.py:SIDES",
            {"num_devices": 20, "partition": {"kind": "natural", "min_size": 8}},
            ["job sides-e2e", "kind='natural' over 20 devices", "use at most 12 devices"],
        ),
    ],
)
def test_a_bad_job_fails_before_the_first_round_and_writes_nothing(
    local_stack: LocalStack, case: str, job: str, overrides: dict[str, Any], expected: list[str]
) -> None:
    # Prepare: a good job file, and the broken variants
    stack = local_stack
    write_job(stack, "sides_job.py", sides_source())
    write_job(stack, "buffers_job.py", sides_source(model=BUFFERS))
    # A model that takes 3 features, for data of 2: the dataset check must catch it
    write_job(stack, "shape_job.py", sides_source(input_shape="(3,)", model=THREE_INPUTS))
    params = small_run(**{**FLOW, "rounds": 1, "registry_wait_s": 1, **overrides})

    # Execute
    with pytest.raises(Exception) as failure:
        run_flow(job=job.format(tmp=stack.tmp), run_id="bad", **params)

    # Assert: the message names the job, what is wrong and the fix; S3 holds nothing
    message = str(failure.value)
    for pattern in expected:
        assert re.search(pattern, message), (case, pattern, message)
    assert stack.store.list_keys("") == [], case
