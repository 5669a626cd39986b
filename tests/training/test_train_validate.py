"""Bad jobs fail before the first round, naming the job, the field and the fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edge.data import Dataset, PartitionError, PartitionScheme
from edge.data.synthetic import synthetic_cifar10_shaped
from edge.jobs import JobSpec, get_job
from edge.jobs.xor import XOR_MOBILE
from edge.training.errors import ExportError
from edge.training.validate import check_exportable, validate_job
from infra.errors import ConfigError


def _xor_like(**overrides: object) -> JobSpec:
    return JobSpec(**{**XOR_MOBILE.__dict__, "name": "probe-mobile", **overrides})  # type: ignore[arg-type]


def test_the_builtin_jobs_pass_with_their_own_data() -> None:
    for name in ("xor-mobile", "hello-mobile"):
        job = get_job(name)
        validate_job(job, job.dataset(job.default_dataset), num_devices=10)
    cifar = get_job("cifar10-mobile")
    validate_job(cifar, synthetic_cifar10_shaped(train_size=400, test_size=10), num_devices=4)


def test_a_model_with_buffers_is_refused_with_the_fix() -> None:
    def with_batchnorm() -> nn.Module:
        return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

    with pytest.raises(ConfigError, match=r"job probe-mobile: model has buffers .*GroupNorm"):
        validate_job(_xor_like(model=with_batchnorm))


def test_a_model_whose_outputs_do_not_fit_the_task_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"returns shape \(2, 3\) .* num_classes=2 logits"):
        validate_job(_xor_like(model=lambda: nn.Linear(2, 3)))
    with pytest.raises(ConfigError, match=r"job probe-mobile: model= or loss= failed .*\(2,\)"):
        validate_job(_xor_like(model=lambda: nn.Linear(5, 2)))


def test_a_loss_that_is_not_one_number_is_refused() -> None:
    def per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="none")

    with pytest.raises(ConfigError, match=r"loss= returned shape .*the batch mean"):
        validate_job(_xor_like(loss=per_example))


def test_a_dataset_whose_shapes_differ_from_input_shape_names_both() -> None:
    data = synthetic_cifar10_shaped(train_size=20, test_size=10)
    with pytest.raises(
        ConfigError, match=r"job probe-mobile: dataset .* shape \(3, 32, 32\) .*input_shape=\("
    ):
        validate_job(_xor_like(), data)


def test_targets_of_the_wrong_kind_are_refused() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 2)).astype(np.float32)
    regression_data = Dataset("r", True, x, x[:, :1].copy(), x, x[:, :1].copy(), num_classes=0)
    with pytest.raises(ConfigError, match="set task='regression'"):
        validate_job(_xor_like(), regression_data)
    many = Dataset("c", True, x, np.arange(8) % 5, x, np.arange(8) % 5, num_classes=5)
    with pytest.raises(ConfigError, match="set num_classes=5"):
        validate_job(_xor_like(), many)


def test_a_natural_partition_with_fewer_owners_than_devices_fails_before_any_round() -> None:
    job = _xor_like(partition=PartitionScheme(kind="natural"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 2)).astype(np.float32)
    y = np.arange(12) % 2
    owned = Dataset("users", True, x, y, x, y, 2, train_owners=np.repeat(["u1", "u2", "u3"], 4))

    validate_job(job, owned, num_devices=3)
    with pytest.raises(
        PartitionError,
        match=r"job probe-mobile: partition kind='natural' over 4 devices: .*at most 3",
    ):
        validate_job(job, owned, num_devices=4)
    unowned = Dataset("anon", True, x, y, x, y, 2)
    with pytest.raises(PartitionError, match=r"job probe-mobile: .*Dataset\.train_owners"):
        validate_job(job, unowned, num_devices=2)


def test_regression_specs_must_say_what_they_regress() -> None:
    base = {
        "name": "reg-mobile",
        "description": "",
        "input_shape": (2,),
        "dataset": XOR_MOBILE.dataset,
        "hyperparams": XOR_MOBILE.hyperparams,
        "model": lambda: nn.Linear(2, 1),
        "task": "regression",
    }
    with pytest.raises(ConfigError, match=r"needs a regression loss, e\.g\. loss=torch"):
        JobSpec(**base)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_classes is for classification"):
        JobSpec(**{**base, "loss": F.mse_loss, "num_classes": 2})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"num_classes must be >= 1 for a classification job"):
        JobSpec(**{**base, "task": "classification"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="task 'ranking' is not one of"):
        JobSpec(**{**base, "task": "ranking"})  # type: ignore[arg-type]
    ok = JobSpec(**{**base, "loss": F.mse_loss, "target_shape": (1,)})  # type: ignore[arg-type]
    validate_job(ok)
    _, y = ok.make_example_batch(4, 0)
    assert y.dtype == np.float32 and y.shape == (4, 1)


def test_an_operator_phones_lack_fails_the_export_check_naming_job_and_op() -> None:
    job = _xor_like(model=lambda: nn.Sequential(nn.Linear(2, 8), nn.SiLU(), nn.Linear(8, 2)))
    validate_job(job)  # eager checks pass: only the runtime lacks the kernel
    with pytest.raises(ExportError, match=r"job probe-mobile: model= .*aten::empty_permuted\.out"):
        check_exportable(job)


def test_a_job_file_that_fails_to_import_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken_job.py"
    path.write_text(textwrap.dedent("import numpy as np\nJOB = np.undefined_thing\n"))
    with pytest.raises(ConfigError, match=r"importing .*broken_job\.py failed with AttributeError"):
        get_job(f"{path}:JOB")
    factory = tmp_path / "factory_job.py"
    factory.write_text("def make():\n    raise RuntimeError('no data here')\n")
    with pytest.raises(ConfigError, match=r"calling .*:make\(\) failed: RuntimeError: no data"):
        get_job(f"{factory}:make")
