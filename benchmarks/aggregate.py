"""How fast does a leaf sum device updates, relative to numpy's own in-place add?

For two model sizes (the CIFAR-10 LeNet, ~62k float32 parameters, and a 10M
parameter model) this sums N weighted updates several ways and reports the
throughput in bytes of update consumed per second, and its ratio to a plain
``np.add(acc, x, out=acc)`` over the same float32 bytes measured in the same run.
Methods are interleaved within each repetition and the best of several
repetitions is kept, so a noisy neighbour slows every method alike.

Every method starts from freshly allocated (zeroed) buffers, so first-touch page
faults are paid by all of them, the float64 accumulator's twice as many.

Run: ``.venv/bin/python benchmarks/aggregate.py [--small-n 64] [--large-n 16]``.
The last line is ``ratio_vs_numpy_add=<ratio>`` for the Accumulator on the 10M model.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import numpy as np

from aggregation.accumulator import Accumulator
from aggregation.guards import check_update
from aggregation.partial import PartialAggregate
from aggregation.tensors import TensorDict, TensorSpec, spec_of

LENET: dict[str, tuple[int, ...]] = {
    "conv1.weight": (6, 3, 5, 5),
    "conv1.bias": (6,),
    "conv2.weight": (16, 6, 5, 5),
    "conv2.bias": (16,),
    "fc1.weight": (120, 400),
    "fc1.bias": (120,),
    "fc2.weight": (84, 120),
    "fc2.bias": (84,),
    "fc3.weight": (10, 84),
    "fc3.bias": (10,),
}

TEN_MILLION: dict[str, tuple[int, ...]] = {
    "embed.weight": (2000, 2500),  # 5,000,000
    "hidden.weight": (2000, 2400),  # 4,800,000
    "hidden.bias": (2000,),
    "out.weight": (99, 2000),  # 198,000 -> 10,000,000 in all
}

Updates = list[tuple[TensorDict, float, dict[str, float]]]


def make_updates(shapes: dict[str, tuple[int, ...]], n: int, seed: int) -> Updates:
    """N float32 updates with sample counts 1..100 and a loss metric each."""
    rng = np.random.default_rng(seed)
    return [
        (
            {k: rng.standard_normal(s, dtype=np.float32) * 0.01 for k, s in shapes.items()},
            float(rng.integers(1, 101)),
            {"loss": float(rng.random())},
        )
        for _ in range(n)
    ]


def numpy_add(spec: dict[str, TensorSpec], updates: Updates) -> object:
    """Baseline: unweighted float32 in-place add, the cheapest possible sum."""
    acc = {name: np.zeros(s.shape, np.float32) for name, s in spec.items()}
    for update, _, _ in updates:
        for name, arr in update.items():
            np.add(acc[name], arr, out=acc[name])
    return acc


def accumulator(flush_every: int) -> Callable[[dict[str, TensorSpec], Updates], object]:
    def run(spec: dict[str, TensorSpec], updates: Updates) -> object:
        acc = Accumulator(spec, flush_every=flush_every)
        for update, weight, metrics in updates:
            acc.add(update, weight=weight, metrics=metrics)
        return acc.result()

    return run


def partial_add_chain(spec: dict[str, TensorSpec], updates: Updates) -> object:
    """The pure ``+`` path: a new float64 array per tensor per update."""
    total = PartialAggregate.zero()
    for update, weight, metrics in updates:
        total = total + PartialAggregate.from_update(update, weight=weight, metrics=metrics)
    return total


def guard_then_accumulate(spec: dict[str, TensorSpec], updates: Updates) -> object:
    """What a leaf really does: every update through the guard, then into the sum."""
    acc = Accumulator(spec)
    for i, (update, weight, metrics) in enumerate(updates):
        checked = check_update(update, spec=spec, device_id=f"d{i}", weight=weight, metrics=metrics)
        acc.add_checked(checked)
    return acc.result()


def measure(
    methods: dict[str, Callable[[dict[str, TensorSpec], Updates], object]],
    spec: dict[str, TensorSpec],
    updates: Updates,
    reps: int,
) -> dict[str, float]:
    """Best wall time per method over ``reps`` interleaved repetitions."""
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(reps):
        for name, method in methods.items():
            start = time.perf_counter()
            method(spec, updates)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def report(label: str, shapes: dict[str, tuple[int, ...]], n: int, reps: int, seed: int) -> float:
    """Print one model's table; return the Accumulator's ratio to the numpy baseline."""
    updates = make_updates(shapes, n, seed)
    spec = spec_of(updates[0][0])
    params = sum(int(np.prod(s)) for s in shapes.values())
    consumed = n * params * 4
    methods = {
        "numpy add (baseline)": numpy_add,
        "Accumulator (staged f32->f64)": accumulator(16),
        "Accumulator all-f64 (flush=1)": accumulator(1),
        "guard + Accumulator": guard_then_accumulate,
        "PartialAggregate + chain": partial_add_chain,
    }
    best = measure(methods, spec, updates, reps)
    base = best["numpy add (baseline)"]
    print(f"\n{label}: {params:,} params, N={n} updates, {consumed / 1e6:,.1f} MB, best of {reps}")
    print(f"{'method':32s} {'time ms':>9s} {'GB/s':>7s} {'ratio':>6s}")
    for name, seconds in best.items():
        rate = consumed / seconds / 1e9
        print(f"{name:32s} {seconds * 1e3:9.2f} {rate:7.2f} {base / seconds:6.2f}")
    return base / best["Accumulator (staged f32->f64)"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-n", type=int, default=64, help="updates of the LeNet size")
    parser.add_argument("--large-n", type=int, default=16, help="updates of the 10M model")
    parser.add_argument("--reps", type=int, default=7, help="repetitions; the best is kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    small = report("CIFAR-10 LeNet", LENET, args.small_n, args.reps * 3, args.seed)
    large = report("10M-parameter model", TEN_MILLION, args.large_n, args.reps, args.seed)
    print(f"\nLeNet: Accumulator at {small:.2f}x numpy add; 10M model (next line):")
    print(f"ratio_vs_numpy_add={large:.2f}")


if __name__ == "__main__":
    main()
