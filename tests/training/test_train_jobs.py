"""Jobs: the registry (built-ins, module:ATTR, file.py:ATTR), specs, hyperparameters, states."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError as PydanticValidationError
from torch import nn

from edge.data import DatasetConfig, device_partition
from edge.jobs import JobSpec, TrainHyperparams, get_job, list_jobs
from edge.jobs.hello import VectorModel
from edge.jobs.xor import XOR_MOBILE
from edge.training import (
    ExecuTorchTrainer,
    PyTorchTrainer,
    RoundModel,
    check_parity,
    export_job_program,
    initial_state,
    state_dict_to_tensors,
    tensors_to_state_dict,
)
from infra.errors import ConfigError

CUSTOM_JOB_FILE = textwrap.dedent(
    '''
    """A user's own job, in one file, touching nothing in Canopy."""
    import numpy as np
    from torch import nn

    from edge.data import Dataset, PartitionScheme
    from edge.jobs import JobSpec, TrainHyperparams


    class Ring(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 2))

        def forward(self, x):
            return self.net(x)


    def rings(config, *, store=None) -> Dataset:
        rng = np.random.default_rng(config.seed)
        def draw(n):
            radius = rng.uniform(0, 2, n)
            angle = rng.uniform(0, 2 * np.pi, n)
            x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1).astype(np.float32)
            return x, (radius > 1).astype(np.int64)
        x, y = draw(400)
        xt, yt = draw(100)
        return Dataset("rings", True, x, y, xt, yt, 2)


    RINGS = JobSpec(
        name="rings-mobile",
        description="Inside or outside the unit circle.",
        input_shape=(2,),
        num_classes=2,
        dataset=rings,
        model=Ring,
        hyperparams=TrainHyperparams(local_epochs=2, batch_size=8, lr=0.1, momentum=0.9),
        partition=PartitionScheme(kind="iid"),
    )
    '''
)


def test_builtin_jobs_are_listed_and_found() -> None:
    assert list_jobs() == ["cifar10-mobile", "hello-mobile", "xor-mobile"]
    for name in list_jobs():
        assert get_job(name).name == name


def test_unknown_job_error_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        get_job("mnist-mobile")
    message = str(info.value)
    assert "cifar10-mobile, hello-mobile, xor-mobile" in message
    assert "path/to/file.py:ATTR" in message


def test_job_from_a_module_reference() -> None:
    assert get_job("edge.jobs.xor:XOR_MOBILE") is XOR_MOBILE
    with pytest.raises(ConfigError, match="has no attribute 'NOPE'"):
        get_job("edge.jobs.xor:NOPE")
    with pytest.raises(ConfigError, match=r"not an edge\.jobs\.JobSpec"):
        get_job("edge.jobs.xor:HIDDEN")
    with pytest.raises(ConfigError, match="not found"):
        get_job("no_such_package.jobs:JOB")


def test_a_user_job_in_one_file_exports_trains_and_passes_parity(tmp_path: Path) -> None:
    # Prepare: the whole job is one file outside Canopy.
    path = tmp_path / "rings_job.py"
    path.write_text(CUSTOM_JOB_FILE)

    # Execute
    job = get_job(f"{path}:RINGS")
    dataset = job.dataset(job.default_dataset)
    x, y = device_partition(dataset, job.partition, 0, 4, seed=0)
    state = initial_state(job, 0)
    exported = export_job_program(job, state)
    assert exported is not None
    et = ExecuTorchTrainer().train(
        job, RoundModel(state, exported.pte), x, y, job.hyperparams, seed=1
    )
    pt = PyTorchTrainer().train(job, RoundModel(state), x, y, job.hyperparams, seed=1)
    report = check_parity(job, state=state, program=exported.pte)

    # Assert
    assert job.name == "rings-mobile"
    assert exported.info.parameter_names == list(state)
    assert et.num_samples == pt.num_samples == 100
    assert report.passed, report
    for name in state:
        np.testing.assert_allclose(et.update[name], pt.update[name], atol=1e-4)


def test_user_job_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        get_job(f"{tmp_path}/missing.py:JOB")
    path = tmp_path / "not_a_job.py"
    path.write_text("JOB = 42\n")
    with pytest.raises(ConfigError, match=r"is a int, not an edge\.jobs\.JobSpec"):
        get_job(f"{path}:JOB")


def test_hyperparameters_are_validated() -> None:
    assert TrainHyperparams(lr=0.1, momentum=0.5).batch_size == 32
    for bad in (
        {"lr": 0.0},
        {"lr": float("nan")},
        {"momentum": 1.0},
        {"batch_size": 0},
        {"local_epochs": 0},
        {"max_steps": 0},
        {"learning_rate": 0.1},
    ):
        with pytest.raises(PydanticValidationError):
            TrainHyperparams(**bad)  # type: ignore[arg-type]


def _spec(**overrides: object) -> JobSpec:
    fields: dict[str, object] = {
        "name": "t",
        "description": "",
        "input_shape": (2,),
        "num_classes": 2,
        "dataset": XOR_MOBILE.dataset,
        "hyperparams": TrainHyperparams(),
        "model": nn.Identity,
    }
    fields.update(overrides)
    return JobSpec(**fields)  # type: ignore[arg-type]


def test_job_spec_refuses_inconsistent_definitions() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        _spec(closed_form=VectorModel(size=2, radius=1.0))
    with pytest.raises(ConfigError, match="exactly one"):
        _spec(model=None)
    with pytest.raises(ConfigError, match="not a valid key segment"):
        _spec(name="../escape")
    with pytest.raises(ConfigError, match="runtimes"):
        _spec(runtimes=frozenset({"tflite"}))


def test_lenet_has_62k_parameters_and_ten_logits() -> None:
    model = get_job("cifar10-mobile").build_model()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 62_006


def test_initial_state_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    job = get_job("cifar10-mobile")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    a = initial_state(job, 4)
    b = initial_state(job, 4)
    c = initial_state(job, 5)

    assert torch.equal(torch.rand(1), expected_next)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])
    assert all(v.dtype == np.float32 for v in a.values())


def test_state_dict_and_tensor_dict_round_trip() -> None:
    model = get_job("xor-mobile").build_model()
    tensors = state_dict_to_tensors(model.state_dict())
    back = tensors_to_state_dict(tensors)

    assert list(tensors) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    tensors["fc1.bias"][0] += 1.0  # a copy: the module is untouched
    assert not torch.equal(torch.from_numpy(tensors["fc1.bias"]), model.fc1.bias.detach())


def test_hello_has_no_program_and_starts_at_zero() -> None:
    job = get_job("hello-mobile")
    assert not job.has_program
    assert export_job_program(job, initial_state(job)) is None
    assert np.array_equal(initial_state(job)["vector"], np.zeros(256, dtype=np.float32))
    with pytest.raises(ConfigError, match="closed-form"):
        job.build_model()
    assert DatasetConfig().source == "synthetic"
