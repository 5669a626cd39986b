"""Benchmark the device trainers: per-step time on ExecuTorch and PyTorch, export time, .pte size.

Usage: ``.venv/bin/python benchmarks/trainers.py [--threads 1] [--repeats 3]``

Per-step time is measured as the difference between a long and a short local
training run, divided by the difference in steps, so program loading, model
construction and validation (fixed per-device costs) are excluded; the minimum
over ``--repeats`` runs is reported, which filters out noise from other work on
the machine. Every job runs at batch size 32. The last line is the ExecuTorch /
PyTorch step-time ratio for cifar10-mobile, e.g. ``et_over_pytorch_step_ratio=38.2``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from aggregation.tensors import TensorDict
from edge.jobs import JobSpec, TrainHyperparams, get_job
from edge.training import (
    DeviceTrainer,
    ExecuTorchTrainer,
    PyTorchTrainer,
    RoundModel,
    export_job_program,
    initial_state,
)

BATCH = 32
# (short, long) step counts per job and runtime: long enough to dominate the timer
# resolution, short enough to finish in about a minute on two cores.
STEPS: dict[tuple[str, str], tuple[int, int]] = {
    ("hello-mobile", "executorch"): (20, 220),
    ("hello-mobile", "pytorch"): (20, 220),
    ("xor-mobile", "executorch"): (20, 220),
    ("xor-mobile", "pytorch"): (20, 220),
    ("cifar10-mobile", "executorch"): (4, 24),
    ("cifar10-mobile", "pytorch"): (10, 110),
}


@dataclass(frozen=True)
class JobFigures:
    job: str
    export_seconds: float | None
    pte_bytes: int | None
    et_step_ms: float
    pytorch_step_ms: float


def _timed_run(
    trainer: DeviceTrainer,
    job: JobSpec,
    model: RoundModel,
    steps: int,
    x: np.ndarray,
    y: np.ndarray,
) -> float:
    hp = TrainHyperparams(
        batch_size=BATCH, max_steps=steps, local_epochs=1000, lr=0.01, momentum=0.9
    )
    started = time.perf_counter()
    trainer.train(job, model, x, y, hp, seed=0)
    return time.perf_counter() - started


def step_seconds(trainer: DeviceTrainer, job: JobSpec, model: RoundModel, repeats: int) -> float:
    short, long = STEPS[(job.name, trainer.runtime)]
    x, y = job.make_example_batch(BATCH * 8, seed=1)
    _timed_run(trainer, job, model, 2, x, y)  # warm-up: allocators, kernels, caches
    best = float("inf")
    for _ in range(repeats):
        t_short = _timed_run(trainer, job, model, short, x, y)
        t_long = _timed_run(trainer, job, model, long, x, y)
        best = min(best, (t_long - t_short) / (long - short))
    return best


def measure(job: JobSpec, repeats: int) -> JobFigures:
    state: TensorDict = initial_state(job, 0)
    started = time.perf_counter()
    exported = export_job_program(job, state, batch_size=BATCH)
    export_seconds = time.perf_counter() - started if exported is not None else None
    program = exported.pte if exported is not None else None
    model = RoundModel(state=state, program=program)
    return JobFigures(
        job=job.name,
        export_seconds=export_seconds,
        pte_bytes=len(program) if program is not None else None,
        et_step_ms=1000 * step_seconds(ExecuTorchTrainer(), job, model, repeats),
        pytorch_step_ms=1000 * step_seconds(PyTorchTrainer(), job, model, repeats),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per figure (min)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"batch {BATCH}, torch threads {args.threads}, min of {args.repeats} repeats")
    print(
        f"{'job':<16}{'export s':>10}{'pte bytes':>11}"
        f"{'ET ms/step':>12}{'PT ms/step':>12}{'ET/PT':>8}"
    )
    figures = {}
    for name in ("hello-mobile", "xor-mobile", "cifar10-mobile"):
        f = measure(get_job(name), args.repeats)
        figures[name] = f
        export = f"{f.export_seconds:.2f}" if f.export_seconds is not None else "none"
        size = str(f.pte_bytes) if f.pte_bytes is not None else "none"
        ratio = f.et_step_ms / f.pytorch_step_ms
        print(
            f"{name:<16}{export:>10}{size:>11}{f.et_step_ms:>12.3f}"
            f"{f.pytorch_step_ms:>12.3f}{ratio:>8.1f}"
        )
    cifar = figures["cifar10-mobile"]
    print(f"et_over_pytorch_step_ratio={cifar.et_step_ms / cifar.pytorch_step_ms:.1f}")


if __name__ == "__main__":
    main()
