"""Which examples each local step uses: a deterministic plan shared by both trainers.

ExecuTorch programs have static shapes, so every batch is full: an epoch is
``ceil(n / batch_size)`` steps over a fresh seeded permutation, and the last
batch wraps around to the start of that permutation (a partition smaller than a
batch repeats examples within the batch). Both runtimes draw their batches from
the same plan, which is what makes their results comparable step for step.
"""

from __future__ import annotations

import math

import numpy as np

from infra.errors import ValidationError


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def batch_plan(
    num_examples: int,
    batch_size: int,
    *,
    local_epochs: int,
    max_steps: int | None,
    seed: int,
) -> list[np.ndarray]:
    """Index arrays, one per optimizer step, each of exactly ``batch_size`` entries."""
    if num_examples < 1:
        raise ValidationError("no local examples: the device's partition is empty")
    if batch_size < 1 or local_epochs < 1:
        raise ValidationError("batch_size and local_epochs must be >= 1")
    rng = np.random.default_rng([seed, 0x5EED])
    per_epoch = steps_per_epoch(num_examples, batch_size)
    total = (
        local_epochs * per_epoch if max_steps is None else min(max_steps, local_epochs * per_epoch)
    )
    plan: list[np.ndarray] = []
    offsets = np.arange(batch_size)
    while len(plan) < total:
        order = rng.permutation(num_examples)
        for step in range(per_epoch):
            if len(plan) == total:
                break
            plan.append(order[(step * batch_size + offsets) % num_examples])
    return plan
