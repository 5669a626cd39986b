"""In-place summing of many updates into one :class:`PartialAggregate`.

``PartialAggregate.__add__`` is pure and allocates a float64 array per tensor per
step; at a leaf that sums hundreds of 40 MB updates that is mostly allocator and
memory traffic. :class:`Accumulator` preallocates flat buffers once and adds each
weighted update in place, walking the tensors in cache-sized blocks.

Precision choice (measured, see ``docs/aggregation.md``): numpy has no fused
"multiply float32 and add into float64" kernel, and its mixed-dtype ufuncs cast
through slow buffered loops, so adding every update straight into float64 ran at
about 0.3x the speed of a plain float32 ``np.add``. Instead, by default, each
weighted update is added into a float32 *staging* buffer, and the stage is folded
into the float64 sum every ``flush_every`` updates (and on
:meth:`Accumulator.result`). Rounding error therefore grows with ``flush_every``
(16 by default), not with the number of devices, and every sum that leaves the
accumulator, crosses the wire or is added up the tree is float64.

``flush_every=1`` turns staging off: products and sums are float64 throughout,
at about half the speed. Models holding float64 or wide-integer tensors always
run that way, so nothing is rounded below the updates' own precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from aggregation.guards import CheckedUpdate
from aggregation.norms import NormHistogram, norm_bin
from aggregation.partial import (
    InconsistentPartials,
    MetricSum,
    PartialAggregate,
    check_metrics,
    check_weight,
    spec_mismatch,
)
from aggregation.tensors import TensorSpec
from infra.errors import ConfigError, ValidationError

DEFAULT_BLOCK_ELEMS = 1 << 17
"""Elements per block: 512 KiB of float32, about one core's L2, so the weighted
temporary is still in cache when it is added to the stage."""

DEFAULT_FLUSH_EVERY = 16
"""Updates summed in float32 before folding the stage into the float64 sum."""


class Accumulator:
    """Sum weighted updates of one model spec in place; hand out a ``PartialAggregate``.

    Parameters
    ----------
    spec
        Names, shapes and dtypes every added update must have (the global model's
        spec). Structure is checked on every add; values are not: check updates
        with :func:`aggregation.guards.check_update` first (or use :meth:`add_checked`).
    flush_every
        Updates staged in float32 between folds into the float64 sum (default: 16).
        1 means no staging: weighted products and sums are float64 throughout.
    block_elems
        Elements processed per step (default: 131072, i.e. 512 KiB of float32).
    """

    def __init__(
        self,
        spec: Mapping[str, TensorSpec],
        *,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        block_elems: int = DEFAULT_BLOCK_ELEMS,
    ) -> None:
        if not spec:
            raise ConfigError("Accumulator needs a non-empty tensor spec")
        if flush_every < 1 or block_elems < 1:
            raise ConfigError(
                f"flush_every and block_elems must be >= 1, got {flush_every} and {block_elems}"
            )
        self._spec = {name: TensorSpec(*spec[name]) for name in sorted(spec)}
        for name, (_, dtype) in self._spec.items():
            if np.dtype(dtype).kind not in "fiu":
                raise ConfigError(f"tensor {name!r} has dtype {dtype}, which cannot be summed")
        exact_in_f32 = all(np.can_cast(s.dtype, np.float32, "safe") for s in self._spec.values())
        # "direct": no float32 stage; updates go straight into the float64 sum.
        self._direct = flush_every == 1 or not exact_in_f32
        self._stage_dtype = np.dtype(np.float64 if self._direct else np.float32)
        self._flush_every = flush_every
        self._block_elems = block_elems
        self._offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name, (shape, _) in self._spec.items():
            size = math.prod(shape)
            self._offsets[name] = (total, total + size)
            total += size
        self._size = total
        self._layout = [(n, s.shape, np.dtype(s.dtype)) for n, s in self._spec.items()]
        self._blocks = self._plan_blocks()
        self._tmp = np.empty(min(block_elems, max(total, 1)), self._stage_dtype)
        self._reset()

    def _plan_blocks(self) -> list[tuple[tuple[str, ...], int, int, int, int]]:
        """Split the flat layout into steps of at most ``block_elems`` elements.

        Each step is ``(names, start, stop, lo, hi)``: either a run of whole small
        tensors (``start == -1``), gathered with one ``np.concatenate``, or the
        ``[start:stop]`` chunk of one large tensor. Stage positions are ``[lo:hi]``.
        Grouping keeps the numpy calls per update few for small models; chunking
        keeps the weighted temporary in cache for large ones.
        """
        blocks: list[tuple[tuple[str, ...], int, int, int, int]] = []
        group: list[str] = []
        group_lo = group_hi = 0
        for name, (lo, hi) in self._offsets.items():
            size = hi - lo
            if group and (hi - group_lo > self._block_elems or size > self._block_elems):
                blocks.append((tuple(group), -1, -1, group_lo, group_hi))
                group = []
            if size > self._block_elems:
                for start in range(0, size, self._block_elems):
                    stop = min(start + self._block_elems, size)
                    blocks.append(((name,), start, stop, lo + start, lo + stop))
                continue
            if not group:
                group_lo = lo
            group.append(name)
            group_hi = hi
        if group:
            blocks.append((tuple(group), -1, -1, group_lo, group_hi))
        return blocks

    def _reset(self) -> None:
        # Left uninitialised: the first fold or partial *copies* into it, so the
        # pages are touched once, by a write, instead of zeroed and then added to.
        self._sum = np.empty(self._size, np.float64)
        self._sum_written = False
        self._stage = self._sum if self._direct else np.empty(self._size, self._stage_dtype)
        self._staged = 0
        self._weight = 0.0
        self._count = 0
        self._metrics: dict[str, MetricSum] = {}
        self._norm_counts: dict[int, int] = {}

    @property
    def count(self) -> int:
        """Device updates (including those inside added partials) summed so far."""
        return self._count

    @property
    def weight(self) -> float:
        return self._weight

    @property
    def spec(self) -> dict[str, TensorSpec]:
        return dict(self._spec)

    def _check_structure(self, update: Mapping[str, np.ndarray]) -> None:
        # Runs once per update: compare dtype objects, not ``dtype.name`` (a slow
        # Python-level property), and key views, not sorted lists.
        if update.keys() != self._spec.keys():
            found = {n: TensorSpec(getattr(a, "shape", ()), "?") for n, a in update.items()}
            raise InconsistentPartials(
                f"update does not fit the accumulator: {spec_mismatch(self._spec, found)}"
            )
        for name, shape, dtype in self._layout:
            arr = update[name]
            if not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != dtype:
                raise InconsistentPartials(
                    f"update tensor {name!r} is {getattr(arr, 'shape', type(arr).__name__)} "
                    f"{getattr(arr, 'dtype', '')}, the accumulator expects {shape} {dtype}"
                )

    def add(
        self,
        update: Mapping[str, np.ndarray],
        *,
        weight: float,
        metrics: Mapping[str, float] | None = None,
        scale: float = 1.0,
        norm: float | None = None,
    ) -> None:
        """Add ``weight * scale * update`` to the sum, ``weight`` to the total weight.

        ``scale`` is the norm-clipping factor from the guard: it shrinks the
        tensors but not the weight or the metrics. ``norm`` (the update's L2
        norm as sent, measured by the guard) goes into the norm histogram; it is
        not computed here, which would cost another pass over the update.
        Everything is checked before anything is written, so a refused update
        leaves the sum untouched.
        """
        w = check_weight(weight)
        factor = check_weight(scale, "scale")
        if factor > 1.0:
            raise ValidationError(f"scale must be in (0, 1], got {factor!r}")
        if norm is not None and not (math.isfinite(norm) and norm >= 0.0):
            raise ValidationError(f"norm must be a finite number >= 0, got {norm!r}")
        values = check_metrics(metrics)
        self._check_structure(update)

        coeff = self._stage_dtype.type(w * factor)
        # The first update into an empty stage (or sum) writes it instead of adding,
        # so buffers are never zeroed.
        overwrite = not self._sum_written if self._direct else self._staged == 0
        tmp, stage = self._tmp, self._stage
        for names, start, stop, lo, hi in self._blocks:
            target = stage[lo:hi]
            if start < 0:  # whole small tensors: gather into the cache-resident scratch
                source = tmp[: hi - lo]
                np.concatenate([update[name] for name in names], axis=None, out=source)
            else:
                source = update[names[0]].reshape(-1)[start:stop]
            if overwrite:
                np.multiply(source, coeff, out=target)
            else:
                scratch = tmp[: hi - lo]
                np.multiply(source, coeff, out=scratch)
                np.add(target, scratch, out=target)

        if self._direct:
            self._sum_written = True
        else:
            self._staged += 1
        self._weight += w
        self._count += 1
        if norm is not None:
            index = norm_bin(norm)
            self._norm_counts[index] = self._norm_counts.get(index, 0) + 1
        for key, value in values.items():
            old = self._metrics.get(key, MetricSum(0.0, 0.0))
            self._metrics[key] = MetricSum(old.total + w * value, old.weight + w)
        if not self._direct and self._staged >= self._flush_every:
            self._flush()

    def add_checked(self, checked: CheckedUpdate) -> None:
        """Add an update that passed :func:`aggregation.guards.check_update` (clip and norm)."""
        self.add(
            checked.tensors,
            weight=checked.weight,
            metrics=checked.metrics,
            scale=checked.scale,
            norm=checked.norm,
        )

    def add_partial(self, partial: PartialAggregate) -> None:
        """Add a partial's float64 sums in place (a middle node summing its children)."""
        if partial.is_zero:
            return
        problem = spec_mismatch(self._spec, partial.spec)
        if problem is not None:
            raise InconsistentPartials(f"cannot add partial to the accumulator: {problem}")
        for name, arr in partial.sums.items():
            lo, hi = self._offsets[name]
            target = self._sum[lo:hi]
            if self._sum_written:
                np.add(target, arr.reshape(-1), out=target)
            else:  # the partial covers every tensor, so this writes the whole buffer
                np.copyto(target, arr.reshape(-1))
        self._sum_written = True
        self._weight += partial.weight
        self._count += partial.count
        for key, (total, mweight) in partial.metrics.items():
            old = self._metrics.get(key, MetricSum(0.0, 0.0))
            self._metrics[key] = MetricSum(old.total + total, old.weight + mweight)
        for index, n in partial.norms.counts.items():
            self._norm_counts[index] = self._norm_counts.get(index, 0) + n

    def _flush(self) -> None:
        """Fold the float32 stage into the float64 sum (a cast copy the first time)."""
        if self._staged == 0:
            return
        if self._sum_written:
            np.add(self._sum, self._stage, out=self._sum)
        else:
            np.copyto(self._sum, self._stage)
            self._sum_written = True
        self._staged = 0

    def result(self) -> PartialAggregate:
        """Hand the sum over as a ``PartialAggregate`` and start again from zero.

        The buffers move into the partial (no copy); the accumulator allocates
        fresh ones, so it can be reused for the next node.
        """
        if self._count == 0:
            return PartialAggregate.zero()
        self._flush()
        sums = {
            name: self._sum[lo:hi].reshape(self._spec[name].shape)
            for name, (lo, hi) in self._offsets.items()
        }
        partial = PartialAggregate(
            sums=sums,
            dtypes={name: s.dtype for name, s in self._spec.items()},
            weight=self._weight,
            count=self._count,
            metrics=self._metrics,
            norms=NormHistogram(self._norm_counts),
        )
        self._reset()
        return partial


def sum_partials(partials: Iterable[PartialAggregate]) -> PartialAggregate:
    """Sum many partials in place; equal (up to float rounding) to ``functools.reduce(+)``.

    Zero partials are skipped; the spec is taken from the first non-zero one and
    every other must match it (:class:`InconsistentPartials` otherwise).
    """
    acc: Accumulator | None = None
    for partial in partials:
        if partial.is_zero:
            continue
        if acc is None:
            acc = Accumulator(partial.spec)
        acc.add_partial(partial)
    return PartialAggregate.zero() if acc is None else acc.result()
