"""ExecuTorch export: program facts, parity for every job, the max-pool regression,
refusing unrunnable ops and buffers, publishing with lineage, and the CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import typer
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

from aggregation.tensors import encode_tensors
from edge.jobs import get_job
from edge.training import (
    ExportedProgram,
    ExportError,
    ParityError,
    ParityReport,
    TrainingError,
    check_parity,
    export_job_program,
    export_program,
    initial_state,
    publish_program,
)
from edge.training.cli import register
from edge.training.et_runtime import registered_operators
from edge.training.program import PROGRAM_IDENTIFIER
from infra.lineage import read_lineage
from infra.store import MemoryObjectStore

# ---------------------------------------------------------------- program facts


def test_cifar_program_describes_itself(cifar_program: ExportedProgram) -> None:
    job = get_job("cifar10-mobile")
    state = initial_state(job, 0)
    info = cifar_program.info

    assert cifar_program.pte[4:8] == PROGRAM_IDENTIFIER
    assert info.sha256 == hashlib.sha256(cifar_program.pte).hexdigest()
    assert info.size_bytes == len(cifar_program.pte)
    # Program parameter names are the network's state_dict names, in order.
    assert info.parameter_names == list(state)
    assert info.parameter_shapes == {k: list(v.shape) for k, v in state.items()}
    assert set(info.parameter_dtypes.values()) == {"float32"}
    assert info.input_shapes == [[32, 3, 32, 32], [32]]
    assert info.input_dtypes == ["float32", "int64"]
    assert info.batch_size == 32
    assert info.maxpool_backward_decomposed
    assert "aten::max_pool2d_with_indices.out" in info.operators
    assert "aten::max_pool2d_with_indices_backward.grad_input" not in info.operators
    assert set(info.operators) <= registered_operators()


def test_export_is_deterministic_for_the_same_state(xor_program: ExportedProgram) -> None:
    job = get_job("xor-mobile")
    again = export_job_program(job, initial_state(job, 0))
    assert again is not None
    assert again.info.sha256 == xor_program.info.sha256


# ---------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def cifar_parity(cifar_program: ExportedProgram) -> ParityReport:
    job = get_job("cifar10-mobile")
    return check_parity(job, state=initial_state(job, 0), program=cifar_program.pte)


def test_parity_cifar10(cifar_program: ExportedProgram, cifar_parity: ParityReport) -> None:
    assert cifar_parity.passed and cifar_parity.max_abs_diff < 1e-5, cifar_parity
    assert cifar_parity.steps == 10
    assert set(cifar_parity.per_tensor) == set(cifar_program.info.parameter_names)


def test_parity_xor(xor_program: ExportedProgram) -> None:
    job = get_job("xor-mobile")
    report = check_parity(job, state=initial_state(job, 0), program=xor_program.pte, steps=20)
    assert report.passed and report.max_abs_diff < 1e-5, report
    assert report.steps == 20


def test_parity_hello_is_exact_by_construction() -> None:
    report = check_parity(get_job("hello-mobile"))
    assert report.passed
    assert report.max_abs_diff == 0.0
    assert report.loss_executorch == report.loss_pytorch


def test_parity_insists_on_momentum_and_enough_steps() -> None:
    job = get_job("hello-mobile")
    with pytest.raises(ValueError, match="at least 10"):
        check_parity(job, steps=5)
    with pytest.raises(ValueError, match="momentum"):
        check_parity(job, momentum=0.0)


# ---------------------------------------------------------------- max-pool regression


def test_maxpool_backward_bug_breaks_training_without_the_workaround(
    cifar_parity: ParityReport,
) -> None:
    """Upstream issue 21686: without the decomposition, Conv->MaxPool training diverges.

    If the first assertion fails, ExecuTorch fixed its kernel and the workaround
    can go; if the second fails, the workaround broke.
    """
    job = get_job("cifar10-mobile")
    state = initial_state(job, 0)
    # Batch 8 keeps the ExecuTorch steps cheap; the bug does not depend on it.
    broken = export_job_program(job, state, batch_size=8, decompose_maxpool_backward=False)
    assert broken is not None and not broken.info.maxpool_backward_decomposed
    assert "aten::max_pool2d_with_indices_backward.grad_input" in broken.info.operators

    try:
        report = check_parity(job, state=state, program=broken.pte)
        diverged = not report.passed
    except TrainingError:  # the loss went NaN: the usual outcome
        diverged = True

    assert diverged, "the upstream max-pool backward kernel trained correctly"
    assert cifar_parity.passed, cifar_parity


# ---------------------------------------------------------------- refusals


class _SiluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.fc(x)))


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 2), torch.zeros(4, dtype=torch.int64)


def test_an_operator_the_runtime_lacks_fails_at_export_by_name() -> None:
    # SiLU's backward lowers to aten::empty_permuted, which the portable runtime lacks.
    assert "aten::empty_permuted.out" not in registered_operators()
    with pytest.raises(ExportError, match=r"no kernel for aten::empty_permuted\.out"):
        export_program(_SiluNet(), F.cross_entropy, _example())


def test_models_with_buffers_are_refused() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ExportError, match="buffers"):
        export_program(model, F.cross_entropy, _example())


def test_untraceable_models_fail_with_the_step_named() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if float(x.sum()) > 0 else -self.fc(x)

    with pytest.raises(ExportError, match="exporting the training program failed"):
        export_program(DataDependent(), F.cross_entropy, _example())


# ---------------------------------------------------------------- publish + lineage


def test_publish_stores_the_program_and_its_lineage(xor_program: ExportedProgram) -> None:
    job = get_job("xor-mobile")
    state = initial_state(job, 0)
    store = MemoryObjectStore()
    global_ref = store.put_bytes(
        "xor-mobile/run-1/round-00000/global.safetensors", encode_tensors(state), kind="model"
    )

    published = publish_program(
        store,
        job,
        state,
        key="xor-mobile/run-1/round-00000/global.pte",
        inputs=[global_ref],
        flow_run_id="flow-run-7",
    )

    assert published is not None
    assert published.ref.sha256 == xor_program.info.sha256
    assert store.get(published.ref.key).data == xor_program.pte
    record = read_lineage(store, published.ref.key)
    assert record is not None and record.kind == "executorch-export"
    assert [i.uri for i in record.inputs] == [global_ref.uri]
    assert record.flow_run_id == "flow-run-7"
    assert record.parameters["parity_max_abs_diff"] == published.parity.max_abs_diff
    assert record.parameters["parameters"] == list(state)


def test_publish_refuses_a_program_that_fails_parity_with_the_figure() -> None:
    job = get_job("xor-mobile")
    store = MemoryObjectStore()
    with pytest.raises(ParityError, match=r"max abs weight difference \d\.\d+e-\d+"):
        publish_program(
            store, job, initial_state(job, 0), key="x/r/round-00000/global.pte", inputs=[], tol=0.0
        )
    assert store.list_keys("") == []


def test_publish_of_hello_writes_nothing() -> None:
    store = MemoryObjectStore()
    job = get_job("hello-mobile")
    assert publish_program(store, job, initial_state(job), key="h/r/p.pte", inputs=[]) is None
    assert store.list_keys("") == []


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_parity_passes_and_fails_on_tolerance(cli: typer.Typer) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["parity", "xor-mobile"])
    strict = runner.invoke(cli, ["parity", "xor-mobile", "--tol", "0"])
    unknown = runner.invoke(cli, ["parity", "nope-mobile"])

    assert ok.exit_code == 0, ok.output
    assert "max abs difference" in ok.output and "PASS" in ok.output
    assert strict.exit_code == 1 and "FAIL" in strict.output
    assert unknown.exit_code == 2 and "Built-in jobs" in unknown.output


def test_cli_export_writes_the_program_and_prints_its_hash(
    cli: typer.Typer, tmp_path: Path, xor_program: ExportedProgram
) -> None:
    out = tmp_path / "xor.pte"
    state_file = tmp_path / "state.safetensors"
    state_file.write_bytes(encode_tensors(initial_state(get_job("xor-mobile"), 0)))

    result = CliRunner().invoke(
        cli, ["export", "xor-mobile", "--out", str(out), "--state", str(state_file)]
    )

    assert result.exit_code == 0, result.output
    written = out.read_bytes()
    assert written == xor_program.pte
    flat = result.output.replace("\n", "")
    assert hashlib.sha256(written).hexdigest() in flat
    assert f"size {len(written)} bytes" in flat


def test_cli_export_refuses_a_parity_failure_and_hello(cli: typer.Typer, tmp_path: Path) -> None:
    runner = CliRunner()
    failing = runner.invoke(
        cli, ["export", "xor-mobile", "--out", str(tmp_path / "x.pte"), "--tol", "0"]
    )
    hello = runner.invoke(cli, ["export", "hello-mobile", "--out", str(tmp_path / "h.pte")])

    assert failing.exit_code == 1 and "refused" in failing.output
    assert "max abs weight difference" in failing.output.replace("\n", " ")
    assert not (tmp_path / "x.pte").exists()
    assert hello.exit_code == 1 and "no ExecuTorch program" in hello.output
    assert not (tmp_path / "h.pte").exists()
