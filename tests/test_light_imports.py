"""Processes that never touch a model must not import torch (issue 11: stack memory, start-up).

A gateway serves bytes and checks shapes with numpy; hyperparameters are plain
pydantic. torch costs about a second of start-up and hundreds of MB per process,
so an accidental top-level import shows up here, not in a benchmark later.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def heavy_modules_after(module: str) -> list[str]:
    """Which of torch / executorch importing ``module`` pulls in, in a fresh interpreter."""
    probe = (
        f"import sys, {module}; "
        "print(','.join(m for m in ('torch', 'executorch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.mark.parametrize(
    "module",
    [
        "edge.gateway.app",
        "edge.jobs",
        "edge.jobs.hyperparams",
        "edge.manifests",
        "flows.federated",  # the runner holds the flow; its fork server preloads torch
    ],
)
def test_module_imports_no_torch(module: str) -> None:
    assert heavy_modules_after(module) == [], f"{module} imports torch or executorch"


def test_job_names_still_resolve_lazily() -> None:
    """The lazy package still hands out every public name, and the built-in jobs load."""
    import edge.jobs as jobs
    from edge.jobs.spec import TrainHyperparams as from_spec

    assert set(jobs.__all__) == set(jobs._HOME)
    assert jobs.get_job("hello-mobile").name == "hello-mobile"
    assert jobs.TrainHyperparams is from_spec
    with pytest.raises(AttributeError, match="no_such_name"):
        jobs.no_such_name  # noqa: B018
