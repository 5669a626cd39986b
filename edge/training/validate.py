"""Check a job before its first round: model, example batch, dataset and partition.

Everything here fails with the job's name, the field at fault and how to fix
it, and runs before anything is written anywhere, so a flow can refuse a bad
job instead of discovering it on the first device (or, for a partition with
too few owners, on the hundredth). The checks are cheap (one forward pass on
two examples, one partition) except :func:`check_exportable`, which exports the
program (seconds for LeNet) and is separate for that reason.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from edge.data.dataset import Dataset
from edge.data.errors import PartitionError
from edge.data.partition import PartitionScheme, partition_indices
from edge.jobs.spec import JobSpec
from edge.training.errors import ExportError
from edge.training.inputs import check_local_data
from edge.training.state import buffers_refusal, initial_state
from infra.errors import ConfigError, ValidationError

if TYPE_CHECKING:
    from edge.training.export import ProgramInfo

_PROBE_BATCH = 2


def validate_job(
    job: JobSpec,
    dataset: Dataset | None = None,
    *,
    scheme: PartitionScheme | None = None,
    num_devices: int | None = None,
    seed: int = 0,
) -> None:
    """Every cheap check that applies: the network, and with ``dataset`` its shapes,
    and with ``num_devices`` too its partition (``scheme``, default the job's)."""
    check_example_batch(job)
    if job.has_program:
        check_model(job)
    if dataset is None:
        return
    check_dataset(job, dataset)
    if num_devices is not None:
        check_partition(job, dataset, scheme or job.partition, num_devices, seed)


def check_example_batch(job: JobSpec) -> None:
    """The batch used to trace the export must look like device data."""
    x, y = job.make_example_batch(_PROBE_BATCH, 0)
    try:
        check_local_data(job, x, y)
    except ValidationError as exc:
        raise ConfigError(
            f"{exc} (in the example batch: fix example_batch=, or leave it out for random "
            "data of input_shape)"
        ) from None


def check_model(job: JobSpec) -> None:
    """A network the program can train: no buffers, outputs of the task's shape, a scalar loss."""
    try:
        module = job.build_model()
    except Exception as exc:  # user code: any error is the model factory's
        raise ConfigError(
            f"job {job.name}: model= failed to build: {type(exc).__name__}: {exc}"
        ) from exc
    refusal = buffers_refusal(module)
    if refusal is not None:
        raise ConfigError(f"job {job.name}: {refusal}")
    x, y = job.make_example_batch(_PROBE_BATCH, 0)
    x, y = check_local_data(job, x, y)
    try:
        with torch.no_grad():
            outputs = module(torch.from_numpy(x))
            loss = job.loss(outputs, torch.from_numpy(y))
    except Exception as exc:  # user code again
        raise ConfigError(
            f"job {job.name}: model= or loss= failed on a batch of input_shape "
            f"{job.input_shape}: {type(exc).__name__}: {exc}"
        ) from exc
    _check_outputs(job, tuple(outputs.shape))
    if loss.ndim != 0 or not math.isfinite(float(loss)):
        raise ConfigError(
            f"job {job.name}: loss= returned shape {tuple(loss.shape)} value "
            f"{loss.flatten()[:3].tolist()}; it must return one finite number, the batch mean"
        )


def _check_outputs(job: JobSpec, shape: tuple[int, ...]) -> None:
    expected: tuple[int, ...]
    if job.task == "classification":
        expected = (_PROBE_BATCH, job.num_classes)
        fix = f"make the network end in num_classes={job.num_classes} logits"
    else:
        expected = (_PROBE_BATCH, *job.target_shape)
        fix = f"make the network return target_shape={job.target_shape} values per example"
    if shape != expected:
        raise ConfigError(
            f"job {job.name}: model= returns shape {shape} for a batch of {_PROBE_BATCH}, "
            f"expected {expected}; {fix}"
        )


def check_dataset(job: JobSpec, dataset: Dataset) -> None:
    """The dataset's examples and targets must be what the job's network takes."""
    where = f"job {job.name}: dataset {dataset.name}"
    if dataset.sample_shape != job.input_shape:
        raise ConfigError(
            f"{where} has examples of shape {dataset.sample_shape} but input_shape is "
            f"{job.input_shape}; set input_shape={dataset.sample_shape} (and a network that "
            "takes it) or reshape the data in the job's dataset factory"
        )
    if job.task == "classification":
        if dataset.is_regression:
            raise ConfigError(
                f"{where} has regression targets (num_classes=0) but the job's task is "
                "classification; set task='regression' and target_shape, or give integer labels"
            )
        if dataset.num_classes > job.num_classes:
            raise ConfigError(
                f"{where} has {dataset.num_classes} classes but num_classes is "
                f"{job.num_classes}; set num_classes={dataset.num_classes}"
            )
        return
    if not dataset.is_regression:
        raise ConfigError(
            f"{where} has class labels (num_classes={dataset.num_classes}) but the job's task "
            "is regression; give float targets with num_classes=0, or set task='classification'"
        )
    if dataset.target_shape != job.target_shape:
        raise ConfigError(
            f"{where} has targets of shape {dataset.target_shape} per example but "
            f"target_shape is {job.target_shape}; set target_shape={dataset.target_shape}"
        )


def check_partition(
    job: JobSpec, dataset: Dataset, scheme: PartitionScheme, num_devices: int, seed: int
) -> None:
    """The partition every simulated device will ask for can be built."""
    try:
        partition_indices(dataset.y_train, scheme, num_devices, seed, owners=dataset.train_owners)
    except PartitionError as exc:
        raise PartitionError(
            f"job {job.name}: partition kind={scheme.kind!r} over {num_devices} devices: {exc}"
        ) from None


def check_exportable(
    job: JobSpec, *, batch_size: int | None = None, seed: int = 0
) -> ProgramInfo | None:
    """Export the job's initial model once: unsupported operators fail here, by name.

    Returns the program's facts (``None`` for closed-form jobs). Costs one export,
    and ExecuTorch's import, which the cheap checks above never pay.
    """
    from edge.training.export import export_job_program

    try:
        exported = export_job_program(job, initial_state(job, seed), batch_size=batch_size)
    except ExportError as exc:
        raise ExportError(f"job {job.name}: model= cannot become a phone program: {exc}") from None
    return exported.info if exported is not None else None
