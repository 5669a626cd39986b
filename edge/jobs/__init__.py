"""Federated jobs: what is trained on devices, with what data and hyperparameters.

Built-ins: ``hello-mobile`` (no network), ``xor-mobile`` (tiny MLP) and
``cifar10-mobile`` (LeNet with max-pooling). ``get_job`` also loads user jobs
from ``package.module:ATTR`` or ``path/to/file.py:ATTR``.

Names are loaded on first use: the built-in jobs and ``JobSpec`` import torch,
and processes that only carry hyperparameters (``edge.jobs.hyperparams``), such
as the edge pool's leaf workers, should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge.jobs.hyperparams import ALL_RUNTIMES, RuntimeName, TrainHyperparams
    from edge.jobs.registry import BUILTIN_JOBS, get_job, list_jobs
    from edge.jobs.spec import (
        ClosedFormModel,
        ClosedFormStep,
        DatasetFactory,
        JobSpec,
        LossFn,
        ModelFactory,
        random_example_batch,
    )

_HOME = {
    "ALL_RUNTIMES": "edge.jobs.hyperparams",
    "RuntimeName": "edge.jobs.hyperparams",
    "TrainHyperparams": "edge.jobs.hyperparams",
    "BUILTIN_JOBS": "edge.jobs.registry",
    "get_job": "edge.jobs.registry",
    "list_jobs": "edge.jobs.registry",
    "ClosedFormModel": "edge.jobs.spec",
    "ClosedFormStep": "edge.jobs.spec",
    "DatasetFactory": "edge.jobs.spec",
    "JobSpec": "edge.jobs.spec",
    "LossFn": "edge.jobs.spec",
    "ModelFactory": "edge.jobs.spec",
    "random_example_batch": "edge.jobs.spec",
}

__all__ = [
    "ALL_RUNTIMES",
    "BUILTIN_JOBS",
    "ClosedFormModel",
    "ClosedFormStep",
    "DatasetFactory",
    "JobSpec",
    "LossFn",
    "ModelFactory",
    "RuntimeName",
    "TrainHyperparams",
    "get_job",
    "list_jobs",
    "random_example_batch",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'edge.jobs' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
