"""Local training of simulated devices, imported and run only in worker processes.

The simulator's event loop only does networking; training happens in a
process pool (two workers by default, one per core), so thousands of devices
can wait on HTTP while both cores train. Requests and replies
(``edge.simulator.work``) are plain picklable dataclasses carrying bytes: the
weights go in as the safetensors the device downloaded, the update comes back
as the safetensors it will upload.

Each worker builds a job's dataset once and reuses it for every device it
trains (``device_split`` caches the partition per dataset), so a device's
data is a pure function of the task's data hint and the device index. When
the run evaluates on devices, the hint's ``holdout`` fraction of each
partition is held out: devices never train on it, and evaluation tasks
(``evaluate_device``) measure the global model on it with the same function as
the server's evaluation (``edge.training.evaluate``), whatever the runtime.
ExecuTorch devices evaluate the safetensors weights with that PyTorch mirror
of their program (docs/orchestration.md says why).

Requests carry the job's *reference* (a built-in name, ``module:ATTR`` or
``path/to/file.py:ATTR``), never its declared name: only the reference can be
loaded. A job file is imported once per worker and again only when the file
changes, so a long-lived simulator (``canopy up``) follows an edited job.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch

from aggregation.tensors import decode_tensors, encode_tensors
from edge.data.config import DatasetConfig
from edge.data.dataset import Dataset
from edge.data.errors import DatasetUnavailableError
from edge.data.partition import PartitionScheme, device_split
from edge.jobs import JobSpec, TrainHyperparams, get_job
from edge.simulator.work import EvaluateReply, FatalTrainingError, TrainReply, TrainRequest
from edge.training import RoundModel, get_trainer
from edge.training.evaluate import evaluate_sums
from edge.training.metrics import means
from infra.errors import ConfigError

_HYPERPARAMS = frozenset(TrainHyperparams.model_fields)
_FATAL = (ConfigError, DatasetUnavailableError)


def resolve_job(reference: str) -> str:
    """The job's declared name (what devices enrol and poll under); an unknown or
    broken job is fatal for the whole simulation."""
    torch.set_num_threads(1)
    try:
        return _job(reference).name
    except _FATAL as exc:
        raise FatalTrainingError(str(exc)) from None


def _file_stamp(reference: str) -> tuple[int, int] | None:
    """(mtime, size) of a ``file.py:ATTR`` job's file: changes when the user edits it."""
    target = reference.rpartition(":")[0]
    if not (target.endswith(".py") or "/" in target or "\\" in target):
        return None  # a built-in name or an importable module: imported once
    try:
        stat = Path(target).stat()
    except OSError:
        return None  # get_job says the file is missing
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _load(reference: str, stamp: tuple[int, int] | None) -> JobSpec:
    del stamp  # part of the cache key only
    return get_job(reference)


def _job(reference: str) -> JobSpec:
    """The spec of ``reference``, imported once per version of its file (not per device)."""
    return _load(reference, _file_stamp(reference))


@functools.lru_cache(maxsize=4)
def _load_dataset(reference: str, stamp: tuple[int, int] | None, config_json: str) -> Dataset:
    """The job's dataset, built once per worker, version of the job file and config."""
    job = _load(reference, stamp)
    return job.dataset(DatasetConfig.model_validate_json(config_json), store=None)


def _partition_of(job: JobSpec, request: TrainRequest) -> tuple[PartitionScheme, int, int, str]:
    """(scheme, partitions, seed, dataset config JSON) from the task's hint or job defaults."""
    hint = request.data_hint or {}
    default = job.partition
    scheme = PartitionScheme(
        kind=hint.get("scheme", default.kind),
        alpha=hint.get("alpha") or default.alpha,
        labels_per_device=hint.get("shards") or default.labels_per_device,
        min_size=hint.get("min_size") or default.min_size,
    )
    partitions = int(hint.get("num_devices") or request.fleet_size)
    seed = int(hint.get("seed", request.fleet_seed))
    dataset = hint.get("dataset")
    config = DatasetConfig.model_validate(dataset) if dataset is not None else job.default_dataset
    return scheme, partitions, seed, config.model_dump_json()


Data = tuple[np.ndarray, np.ndarray]


def _device_data(request: TrainRequest) -> tuple[JobSpec, Data, Data, int]:
    """(job, training data, held-out data, partition) of the requesting device."""
    try:
        stamp = _file_stamp(request.job)  # once: the spec and its data from one version
        job = _load(request.job, stamp)
        scheme, partitions, seed, config_json = _partition_of(job, request)
        partition = request.device_index % partitions
        holdout = float((request.data_hint or {}).get("holdout") or 0.0)
        dataset = _load_dataset(request.job, stamp, config_json)
        train, held = device_split(dataset, scheme, partition, partitions, seed, holdout)
    except _FATAL as exc:  # the same for every device: no point in going on
        raise FatalTrainingError(f"{request.job}: {exc}") from None
    return job, train, held, partition


def train_device(request: TrainRequest) -> TrainReply:
    """Train one device's partition from the downloaded model; runs in a worker process."""
    started = time.perf_counter()
    job, (x, y), _, partition = _device_data(request)
    state, _ = decode_tensors(request.weights, source="downloaded global model")
    hyper = TrainHyperparams.model_validate(
        {k: v for k, v in request.hyperparams.items() if k in _HYPERPARAMS and v is not None}
    )
    train_seed = int(request.hyperparams.get("seed", 0)) * 1_000_003 + request.device_index
    result = get_trainer(request.runtime).train(
        job, RoundModel(state=state, program=request.program), x, y, hyper, seed=train_seed
    )
    return TrainReply(
        update=encode_tensors(result.update),
        num_samples=result.num_samples,
        metrics=dict(result.metrics),
        seconds=time.perf_counter() - started,
        partition=partition,
    )


def evaluate_device(request: TrainRequest) -> EvaluateReply:
    """Evaluate the downloaded global model on the device's held-out data (no training).

    The job's metrics as means over the held-out examples, computed by
    ``edge.training.evaluate.evaluate_sums``: the server's evaluation code, so
    the numbers agree with it on the same examples, for either runtime.
    """
    started = time.perf_counter()
    job, _, (x, y), partition = _device_data(request)
    if x.shape[0] == 0:
        return EvaluateReply(0, {}, time.perf_counter() - started, partition)
    state, _ = decode_tensors(request.weights, source="downloaded global model")
    metrics = means(evaluate_sums(job, state, x, y))
    return EvaluateReply(int(x.shape[0]), metrics, time.perf_counter() - started, partition)
