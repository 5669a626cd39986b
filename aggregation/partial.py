"""The one summable type of Canopy's aggregation tree: ``PartialAggregate``.

A partial holds *pre-weighted sums*, never means: per tensor the sum of
``weight * update`` (float64), the total weight (sample count), the device
count and, per metric, the weighted sum and the weight that reported it. Leaf,
middle and root nodes of the tree only ever add partials; the root divides by
the weight once, in :meth:`PartialAggregate.finalize`. Averaging averages at
intermediate levels would weight every node equally, whatever its sample count,
which is the classic tree-aggregation bug (see ``docs/aggregation.md``).

Following pfl-research's ``TrainingStatistics`` contract, ``+`` is associative and
commutative, :meth:`PartialAggregate.zero` is its identity, and the vector form
(:meth:`~PartialAggregate.to_vectors` / :meth:`~PartialAggregate.from_vectors`)
sums like the objects do. Unlike pfl, invariants coming from the wire are checked
with ``raise``, never ``assert``.

Summing thousands of updates by ``a + b`` allocates a new float64 array per tensor
per step; :class:`Accumulator` (module ``aggregation.accumulator``) adds in place.

A partial also carries a :class:`~aggregation.norms.NormHistogram` of the norms
of the updates it summed (when they were measured, i.e. checked by the guard), so
the root can set the next round's adaptive norm bound from the whole round
(``aggregation.clipping``). Counts add exactly, so the monoid laws hold for it too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from aggregation.norms import NormHistogram
from aggregation.tensors import TensorDict, TensorSpec, decode_tensors, encode_tensors
from infra.errors import ValidationError

WIRE_FORMAT = "canopy.partial-aggregate/1"
"""Value of the ``format`` field of the metadata; bumped if the wire form ever changes."""

META_KEY = "canopy.partial"
"""The one safetensors metadata key, holding sorted JSON. One key, because safetensors
does not keep the order of several, and content-addressed keys need stable bytes."""

_SUMMABLE_KINDS = frozenset("fiu")  # float, signed and unsigned int: what an update may hold


class InconsistentPartials(ValidationError):
    """Two partials (or a partial and a spec) disagree on tensor names, shapes or dtypes.

    This means they were built against different global models, so they cannot be
    summed; the caller should drop the stray partial or fail the round, never guess.
    """


class EmptyAggregate(ValidationError):
    """``finalize`` was called on an aggregate no device contributed to."""


class MetricSum(NamedTuple):
    """Weighted sum of one metric and the weight of the devices that reported it.

    The weight is kept per metric, not shared with the tensors, so that devices
    which do not report a metric (older app versions, say) do not drag its mean
    towards zero.
    """

    total: float
    weight: float


def check_weight(weight: object, what: str = "weight") -> float:
    """Return ``weight`` as a float if it is a positive finite number, else raise.

    A sample count of 0, a negative one or NaN would silently corrupt every mean
    computed from the sum, so it is refused at the door.
    """
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.integer | np.floating):
        raise ValidationError(f"{what} must be a number, got {type(weight).__name__}")
    value = float(weight)
    if not math.isfinite(value) or value <= 0.0:
        raise ValidationError(f"{what} must be a positive finite number, got {value!r}")
    return value


def check_metrics(metrics: Mapping[str, float] | None, what: str = "metrics") -> dict[str, float]:
    """Return ``metrics`` as ``{name: float}`` if every value is a finite number, else raise."""
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if not isinstance(name, str) or not name:
            raise ValidationError(f"{what}: metric names must be non-empty strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise ValidationError(
                f"{what}: metric {name!r} must be a number, got {type(value).__name__}"
            )
        number = float(value)
        if not math.isfinite(number):
            raise ValidationError(f"{what}: metric {name!r} is not finite ({number!r})")
        out[name] = number
    return out


def spec_mismatch(
    expected: Mapping[str, TensorSpec], found: Mapping[str, TensorSpec]
) -> str | None:
    """Describe how two specs differ (names first, then shapes and dtypes), or ``None``."""
    missing = sorted(set(expected) - set(found))
    unknown = sorted(set(found) - set(expected))
    if missing or unknown:
        return f"tensor names differ (missing: {missing}; unexpected: {unknown})"
    for name in sorted(expected):
        if expected[name] != found[name]:
            return (
                f"tensor {name!r} is {found[name].shape} {found[name].dtype}, "
                f"expected {expected[name].shape} {expected[name].dtype}"
            )
    return None


class PartialAggregate:
    """Pre-weighted sums of device updates: the value every node of the tree adds.

    Instances are immutable: the sum arrays are marked read-only, ``+`` returns a
    new object, and the constructor takes ownership of the arrays it is given.

    Parameters
    ----------
    sums
        Per tensor name, the float64 sum of ``weight * update``.
    dtypes
        Per tensor name, the dtype of the updates (and of the mean ``finalize``
        returns), e.g. ``"float32"``.
    weight
        Total weight (sample count) of the contributing updates; 0 only for zero.
    count
        Number of contributing device updates; 0 only for zero.
    metrics
        Per metric name, its :class:`MetricSum`.
    norms
        Histogram of the norms (as sent, before clipping) of the summed updates
        whose norm was measured; at most ``count`` of them (default: empty).
    """

    __slots__ = ("_count", "_dtypes", "_metrics", "_norms", "_sums", "_weight")

    def __init__(
        self,
        *,
        sums: Mapping[str, np.ndarray],
        dtypes: Mapping[str, str],
        weight: float,
        count: int,
        metrics: Mapping[str, MetricSum],
        norms: NormHistogram | None = None,
    ) -> None:
        if set(sums) != set(dtypes):
            raise ValidationError(
                f"partial aggregate: sums name {sorted(sums)} but dtypes name {sorted(dtypes)}"
            )
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
            raise ValidationError(f"partial aggregate: count must be an int >= 0, got {count!r}")
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0.0:
            raise ValidationError(
                f"partial aggregate: weight must be finite and >= 0, got {weight!r}"
            )
        if (count == 0) != (weight == 0.0) or (count == 0) != (not sums):
            raise ValidationError(
                "partial aggregate: count, weight and tensors must be all zero/empty or all "
                f"non-zero (count={count}, weight={weight!r}, tensors={len(sums)})"
            )
        if count == 0 and metrics:
            raise ValidationError("partial aggregate: an empty aggregate cannot carry metrics")
        norms = NormHistogram.zero() if norms is None else norms
        if not isinstance(norms, NormHistogram):
            raise ValidationError(
                f"partial aggregate: norms must be a NormHistogram, got {type(norms).__name__}"
            )
        if norms.total > count:
            raise ValidationError(
                f"partial aggregate: {norms.total} norms counted for {count} updates"
            )
        owned: dict[str, np.ndarray] = {}
        for name in sorted(sums):
            arr = sums[name]
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float64:
                raise ValidationError(
                    f"partial aggregate: sum of {name!r} must be a float64 array, "
                    f"got {getattr(arr, 'dtype', type(arr).__name__)}"
                )
            if np.dtype(dtypes[name]).kind not in _SUMMABLE_KINDS:
                raise ValidationError(
                    f"partial aggregate: dtype {dtypes[name]!r} of {name!r} is not summable"
                )
            arr.setflags(write=False)
            owned[name] = arr
        checked_metrics: dict[str, MetricSum] = {}
        for key in sorted(metrics):
            total, mweight = (float(v) for v in metrics[key])
            if not (math.isfinite(total) and math.isfinite(mweight) and mweight > 0.0):
                raise ValidationError(
                    f"partial aggregate: metric {key!r} needs a finite sum and a positive "
                    f"finite weight, got ({total!r}, {mweight!r})"
                )
            checked_metrics[key] = MetricSum(total, mweight)
        self._sums = owned
        self._dtypes = {name: str(np.dtype(dtypes[name]).name) for name in owned}
        self._weight = weight
        self._count = int(count)
        self._metrics = checked_metrics
        self._norms = norms

    # -- construction --------------------------------------------------------------

    @classmethod
    def zero(cls) -> PartialAggregate:
        """The identity of ``+``: no tensors, no weight, no devices, no metrics."""
        return cls(sums={}, dtypes={}, weight=0.0, count=0, metrics={})

    @classmethod
    def from_update(
        cls,
        update: Mapping[str, np.ndarray],
        *,
        weight: float,
        metrics: Mapping[str, float] | None = None,
        norm: float | None = None,
    ) -> PartialAggregate:
        """A partial of one device update, weighted by its sample count.

        Checks the weight and the metrics but not the tensor values: run the update
        through :func:`aggregation.guards.check_update` first. ``norm`` is the
        update's L2 norm as the guard measured it, for the norm histogram.
        """
        w = check_weight(weight)
        values = check_metrics(metrics)
        norms = NormHistogram.zero() if norm is None else NormHistogram.of([norm])
        if not update:
            raise ValidationError("an update must hold at least one tensor")
        sums: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for name, arr in update.items():
            if not isinstance(arr, np.ndarray) or arr.dtype.kind not in _SUMMABLE_KINDS:
                raise ValidationError(
                    f"update tensor {name!r} must be a numeric array, "
                    f"got {getattr(arr, 'dtype', type(arr).__name__)}"
                )
            # asarray: numpy returns a scalar, not a 0-d array, for 0-d inputs
            sums[name] = np.asarray(np.multiply(arr, w, dtype=np.float64))
            dtypes[name] = arr.dtype.name
        return cls(
            sums=sums,
            dtypes=dtypes,
            weight=w,
            count=1,
            metrics={k: MetricSum(w * v, w) for k, v in values.items()},
            norms=norms,
        )

    # -- read-only views -----------------------------------------------------------

    @property
    def sums(self) -> Mapping[str, np.ndarray]:
        """Per tensor, the float64 weighted sum (read-only arrays)."""
        return MappingProxyType(self._sums)

    @property
    def dtypes(self) -> Mapping[str, str]:
        return MappingProxyType(self._dtypes)

    @property
    def weight(self) -> float:
        return self._weight

    @property
    def count(self) -> int:
        return self._count

    @property
    def metrics(self) -> Mapping[str, MetricSum]:
        return MappingProxyType(self._metrics)

    @property
    def norms(self) -> NormHistogram:
        """Histogram of the summed updates' norms (those the guard measured)."""
        return self._norms

    @property
    def is_zero(self) -> bool:
        return self._count == 0

    @property
    def spec(self) -> dict[str, TensorSpec]:
        """Shapes and *update* dtypes (not float64): comparable with the global model's spec."""
        return {name: TensorSpec(s.shape, self._dtypes[name]) for name, s in self._sums.items()}

    # -- the monoid ----------------------------------------------------------------

    def __add__(self, other: object) -> PartialAggregate:
        """Sum two partials; exact for weight and count, float64 for the tensors."""
        if not isinstance(other, PartialAggregate):
            return NotImplemented
        if other.is_zero:
            return self
        if self.is_zero:
            return other
        problem = spec_mismatch(self.spec, other.spec)
        if problem is not None:
            raise InconsistentPartials(
                f"cannot add partial aggregates: {problem}; both must come from updates "
                "against the same global model"
            )
        metrics = dict(self._metrics)
        for key, (total, mweight) in other._metrics.items():
            mine = metrics.get(key, MetricSum(0.0, 0.0))
            metrics[key] = MetricSum(mine.total + total, mine.weight + mweight)
        return PartialAggregate(
            sums={name: np.asarray(self._sums[name] + other._sums[name]) for name in self._sums},
            dtypes=self._dtypes,
            weight=self._weight + other._weight,
            count=self._count + other._count,
            metrics=metrics,
            norms=self._norms + other._norms,
        )

    def scaled(self, factor: float) -> PartialAggregate:
        """The partial with every summed update shrunk by ``factor`` in (0, 1].

        Multiplies the tensor sums only: weight, count, metrics and the norm
        histogram (norms as sent) are kept, exactly as if each update had been
        clipped by ``factor`` before it was summed. Round 0's check across
        leaves uses it on an outsized leaf (``aggregation.clipping``).
        """
        value = check_weight(factor, "scale factor")
        if value > 1.0:
            raise ValidationError(f"scale factor must be in (0, 1], got {value!r}")
        if value == 1.0 or self.is_zero:
            return self
        return PartialAggregate(
            sums={name: np.asarray(arr * value) for name, arr in self._sums.items()},
            dtypes=self._dtypes,
            weight=self._weight,
            count=self._count,
            metrics=self._metrics,
            norms=self._norms,
        )

    def __eq__(self, other: object) -> bool:
        """Exact equality: same names, dtypes, shapes, sums, weight, count, metrics, norms."""
        if not isinstance(other, PartialAggregate):
            return NotImplemented
        return (
            self._dtypes == other._dtypes
            and self._weight == other._weight
            and self._count == other._count
            and self._metrics == other._metrics
            and self._norms == other._norms
            and all(
                self._sums[n].shape == other._sums[n].shape
                and np.array_equal(self._sums[n], other._sums[n])
                for n in self._sums
            )
        )

    __hash__ = None  # type: ignore[assignment]  # equality is by value over arrays

    def __repr__(self) -> str:
        return (
            f"PartialAggregate(count={self._count}, weight={self._weight!r}, "
            f"tensors={len(self._sums)}, metrics={sorted(self._metrics)})"
        )

    # -- the root's one division ---------------------------------------------------

    def finalize(self) -> tuple[TensorDict, dict[str, float]]:
        """Mean update (in the updates' dtypes) and weighted-mean metrics.

        This is the only place Canopy divides by the weight, and it runs at the
        root only; intermediate nodes keep sums so the tree shape cannot bias
        the mean.
        """
        if self.is_zero:
            raise EmptyAggregate(
                "cannot finalise an empty aggregate: no device update was accepted this "
                "round, so there is no mean update; the round should be failed or retried"
            )
        mean: TensorDict = {}
        for name, total in self._sums.items():
            avg = np.asarray(total / self._weight)
            dtype = np.dtype(self._dtypes[name])
            if dtype.kind != "f":
                np.rint(avg, out=avg)  # integer buffers (e.g. step counters) round, not floor
            mean[name] = avg.astype(dtype)
        metrics = {key: m.total / m.weight for key, m in self._metrics.items()}
        return mean, metrics

    # -- wire forms ----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """safetensors: float64 sums as tensors; weight, count, dtypes, metrics as metadata.

        Floats are written with ``repr`` (what ``json`` does), which Python reads
        back to the same double, and the JSON is sorted, so
        ``from_bytes(to_bytes(p)) == p`` bit for bit and equal partials give equal bytes.
        """
        header = {
            "format": WIRE_FORMAT,
            "weight": self._weight,
            "count": self._count,
            "dtypes": self._dtypes,
            "metrics": {k: [m.total, m.weight] for k, m in self._metrics.items()},
        }
        if self._norms.total:  # absent when empty, so partials without norms keep their bytes
            header["norms"] = self._norms.to_json()
        return encode_tensors(self._sums, {META_KEY: json.dumps(header, sort_keys=True)})

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        source: str = "partial aggregate",
        expected_spec: Mapping[str, TensorSpec] | None = None,
    ) -> PartialAggregate:
        """Parse and check a partial written by :meth:`to_bytes`.

        The bytes come from S3, so everything is checked: the format marker, the
        metadata, that sums are float64 and finite, and (if ``expected_spec`` is
        given and the partial is not zero) that it matches the global model.
        """
        tensors, meta = decode_tensors(data, source=source)
        try:
            header = json.loads(meta[META_KEY])
        except (KeyError, ValueError) as exc:
            raise ValidationError(
                f"{source}: not a partial aggregate (no valid {META_KEY!r} metadata: {exc})"
            ) from exc
        if not isinstance(header, dict) or header.get("format") != WIRE_FORMAT:
            found = header.get("format") if isinstance(header, dict) else header
            raise ValidationError(
                f"{source}: partial-aggregate format is {found!r}, expected {WIRE_FORMAT!r}"
            )
        try:
            weight = header["weight"]
            count = header["count"]
            dtypes = header["dtypes"]
            metrics = {
                str(k): MetricSum(float(v[0]), float(v[1])) for k, v in header["metrics"].items()
            }
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise TypeError("weight must be a number")
            if not isinstance(dtypes, dict):
                raise TypeError("dtypes must be an object")
            norms = NormHistogram.from_json(header.get("norms", {}), source=source)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise ValidationError(f"{source}: malformed partial metadata ({exc})") from exc
        for name, arr in tensors.items():
            if arr.dtype == np.float64 and not np.isfinite(arr).all():
                raise ValidationError(f"{source}: sum of tensor {name!r} is not finite")
        try:
            partial = cls(
                sums=tensors,
                dtypes=dtypes,
                weight=weight,
                count=count,
                metrics=metrics,
                norms=norms,
            )
        except (ValidationError, TypeError) as exc:
            raise ValidationError(f"{source}: {exc}") from exc
        if expected_spec is not None and not partial.is_zero:
            problem = spec_mismatch(expected_spec, partial.spec)
            if problem is not None:
                raise InconsistentPartials(f"{source}: does not match the global model: {problem}")
        return partial

    def to_vectors(self) -> list[np.ndarray]:
        """Flat float64 vectors whose element-wise sum is the sum of the partials.

        One vector per tensor (sorted by name), then one of scalars:
        ``[weight, count, total_0, weight_0, total_1, weight_1, ...]`` for the
        metrics sorted by name, then, if the partial has measured norms, the
        dense norm histogram (``aggregation.norms.NUM_BINS`` counts). This is
        pfl's ``get_weights`` contract: for two partials of the same structure
        (tensors, metric names, norms measured or not),
        ``a.from_vectors(va + vb) == a + b`` (up to float rounding), so a
        transport that only knows how to sum flat vectors (all-reduce, secure
        aggregation) can aggregate partials.
        """
        scalars = [self._weight, float(self._count)]
        for m in self._metrics.values():
            scalars.extend((m.total, m.weight))
        vectors = [s.reshape(-1) for s in self._sums.values()] + [np.array(scalars, np.float64)]
        if self._norms.total:
            vectors.append(self._norms.to_vector())
        return vectors

    def from_vectors(self, vectors: Sequence[np.ndarray]) -> PartialAggregate:
        """Rebuild a partial with this partial's structure from :meth:`to_vectors` output."""
        shapes = [s.shape for s in self._sums.values()]
        with_norms = self._norms.total > 0
        expected = len(shapes) + 1 + with_norms
        if len(vectors) != expected:
            raise ValidationError(f"from_vectors: expected {expected} vectors, got {len(vectors)}")
        norms = NormHistogram.from_vector(vectors[-1]) if with_norms else NormHistogram.zero()
        scalars = np.asarray(vectors[len(shapes)], dtype=np.float64)
        if scalars.shape != (2 + 2 * len(self._metrics),):
            raise ValidationError(
                f"from_vectors: scalar vector has shape {scalars.shape}, "
                f"expected ({2 + 2 * len(self._metrics)},)"
            )
        count = float(scalars[1])
        if not count.is_integer():
            raise ValidationError(f"from_vectors: device count {count!r} is not an integer")
        sums: dict[str, np.ndarray] = {}
        for name, shape, vec in zip(self._sums, shapes, vectors[: len(shapes)], strict=True):
            arr = np.asarray(vec, dtype=np.float64)
            if arr.size != math.prod(shape):
                raise ValidationError(
                    f"from_vectors: vector for {name!r} has {arr.size} elements, "
                    f"expected {math.prod(shape)}"
                )
            sums[name] = arr.reshape(shape).copy()
        metrics = {
            key: MetricSum(float(scalars[2 + 2 * i]), float(scalars[3 + 2 * i]))
            for i, key in enumerate(self._metrics)
        }
        return PartialAggregate(
            sums=sums,
            dtypes=self._dtypes,
            weight=float(scalars[0]),
            count=int(count),
            metrics=metrics,
            norms=norms,
        )
