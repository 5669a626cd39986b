"""Federated jobs: what is trained on devices, with what data and hyperparameters.

Built-ins: ``hello-mobile`` (no network), ``xor-mobile`` (tiny MLP) and
``cifar10-mobile`` (LeNet with max-pooling). ``get_job`` also loads user jobs
from ``package.module:ATTR`` or ``path/to/file.py:ATTR``.
"""

from edge.jobs.registry import BUILTIN_JOBS, get_job, list_jobs
from edge.jobs.spec import (
    ALL_RUNTIMES,
    ClosedFormModel,
    ClosedFormStep,
    DatasetFactory,
    JobSpec,
    LossFn,
    ModelFactory,
    RuntimeName,
    TrainHyperparams,
    random_example_batch,
)

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
