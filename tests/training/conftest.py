"""Fixtures shared by the training tests: one torch thread, and each exported program once.

Exporting is the slow part of these tests (about 5 s for LeNet), and the same
program serves every module that only reads it, so the programs are built once
per session.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from aggregation.tensors import TensorDict
from edge.jobs import JobSpec, get_job
from edge.training import ExportedProgram, export_job_program, initial_state


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """LeNet steps are ~10x faster on one thread when two cores are shared with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _export_initial(job: JobSpec) -> ExportedProgram:
    exported = export_job_program(job, initial_state(job, 0))
    assert exported is not None
    return exported


@pytest.fixture(scope="session")
def xor() -> JobSpec:
    return get_job("xor-mobile")


@pytest.fixture(scope="session")
def xor_state(xor: JobSpec) -> TensorDict:
    """xor-mobile's seed-0 initial state: what ``xor_program`` was exported from."""
    return initial_state(xor, 0)


@pytest.fixture(scope="session")
def xor_program(xor: JobSpec) -> ExportedProgram:
    return _export_initial(xor)


@pytest.fixture(scope="session")
def xor_pte(xor_program: ExportedProgram) -> bytes:
    return xor_program.pte


@pytest.fixture(scope="session")
def cifar_program() -> ExportedProgram:
    return _export_initial(get_job("cifar10-mobile"))
