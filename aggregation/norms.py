"""``NormHistogram``: how large the round's updates were, in a form every tree node can add.

The adaptive norm bound (``aggregation.clipping``) needs a quantile of the
round's update norms at the root, but the root never sees an update: it sees
the sum of its children's partials. A quantile is not summable; a histogram
is. So each summed update adds one count to a fixed log-scale bin, partials
carry the counts (a commutative monoid: counts add, the empty histogram is the
identity, exactly, with no float rounding), and the root reads the quantile
from the total.

Bins are a quarter of an octave wide (a factor 2**0.25, about 19%) from 2**-64
to 2**64, plus one bin below (zero and negligible norms, which carry no
information about scale) and one above (norms no honest update has). Bin edges
are found with ``math.frexp`` and three constant comparisons, not a logarithm,
so a norm falls in the same bin on every machine. The quantile is reported as
the bin's geometric centre, within 9% of the true value, which is plenty for a
bound that is a multiple of it.

Memory and wire cost are small: the histogram is sparse (only occupied bins, a
few dozen for a round), and its dense vector form for transports that sum flat
vectors is 514 float64s.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType

import numpy as np

from infra.errors import ValidationError

BINS_PER_OCTAVE = 4
LOWEST_EXPONENT = -64
HIGHEST_EXPONENT = 64
NUM_BINS = (HIGHEST_EXPONENT - LOWEST_EXPONENT) * BINS_PER_OCTAVE + 2
"""514: the log-scale bins plus one below and one above."""

UNDERFLOW_BIN = 0
OVERFLOW_BIN = NUM_BINS - 1

SMALLEST_MEASURABLE = 2.0**LOWEST_EXPONENT
"""Norms below this (about 5e-20), zero included, say nothing about the scale of updates."""

_LARGEST = 2.0**HIGHEST_EXPONENT
_SUB_EDGES = tuple(math.exp2(k / BINS_PER_OCTAVE) for k in range(1, BINS_PER_OCTAVE))


def is_measurable(norm: float) -> bool:
    """Whether ``norm`` counts towards quantiles (positive and not negligible)."""
    return norm >= SMALLEST_MEASURABLE


def norm_bin(norm: float) -> int:
    """The bin of an L2 norm (a finite number >= 0)."""
    if not is_measurable(norm):
        return UNDERFLOW_BIN
    if norm >= _LARGEST:
        return OVERFLOW_BIN
    mantissa, exponent = math.frexp(norm)  # norm = mantissa * 2**exponent, mantissa in [0.5, 1)
    octave = exponent - 1 - LOWEST_EXPONENT
    return 1 + octave * BINS_PER_OCTAVE + bisect.bisect_right(_SUB_EDGES, 2.0 * mantissa)


def bin_centre(index: int) -> float:
    """A representative norm of bin ``index``: the geometric centre of its range."""
    if index == UNDERFLOW_BIN:
        return 0.0
    if index == OVERFLOW_BIN:
        return _LARGEST
    return math.exp2(LOWEST_EXPONENT + (index - 0.5) / BINS_PER_OCTAVE)


def bin_ceiling(index: int) -> float:
    """The top edge of bin ``index``: no norm in it is this large (``inf`` for the overflow bin)."""
    if index == UNDERFLOW_BIN:
        return SMALLEST_MEASURABLE
    if index == OVERFLOW_BIN:
        return math.inf
    # the same edges norm_bin compares with, so a norm is always below its bin's ceiling
    octave, sub = divmod(index - 1, BINS_PER_OCTAVE)
    return math.ldexp((*_SUB_EDGES, 2.0)[sub], LOWEST_EXPONENT + octave)


def _check_counts(counts: Mapping[int, int], what: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for index in sorted(counts):
        count = counts[index]
        bad_index = isinstance(index, bool) or not isinstance(index, int | np.integer)
        if bad_index or not 0 <= index < NUM_BINS:
            raise ValidationError(f"{what}: bin {index!r} is not in [0, {NUM_BINS})")
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
            raise ValidationError(
                f"{what}: count of bin {index} must be an int >= 0, got {count!r}"
            )
        if count:
            out[int(index)] = int(count)
    return out


class NormHistogram:
    """Counts of update norms per log-scale bin; add them, read quantiles from the total.

    Immutable. ``a + b`` is associative and commutative exactly (integer counts),
    and :meth:`zero` is its identity.
    """

    __slots__ = ("_counts",)

    def __init__(self, counts: Mapping[int, int] | None = None) -> None:
        self._counts = _check_counts(counts or {}, "norm histogram")

    @classmethod
    def zero(cls) -> NormHistogram:
        return cls()

    @classmethod
    def of(cls, norms: Iterable[float]) -> NormHistogram:
        """The histogram of some norms (each a finite number >= 0)."""
        counts: dict[int, int] = {}
        for norm in norms:
            if not (math.isfinite(norm) and norm >= 0.0):
                raise ValidationError(f"an update norm must be finite and >= 0, got {norm!r}")
            index = norm_bin(norm)
            counts[index] = counts.get(index, 0) + 1
        return cls(counts)

    @property
    def counts(self) -> Mapping[int, int]:
        """Occupied bins and their counts (read-only, sorted by bin)."""
        return MappingProxyType(self._counts)

    @property
    def total(self) -> int:
        """Number of norms counted."""
        return sum(self._counts.values())

    def __add__(self, other: object) -> NormHistogram:
        if not isinstance(other, NormHistogram):
            return NotImplemented
        if not other._counts:
            return self
        if not self._counts:
            return other
        merged = dict(self._counts)
        for index, count in other._counts.items():
            merged[index] = merged.get(index, 0) + count
        return NormHistogram(merged)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NormHistogram):
            return NotImplemented
        return self._counts == other._counts

    def __hash__(self) -> int:
        return hash(tuple(self._counts.items()))

    def __repr__(self) -> str:
        return f"NormHistogram(total={self.total}, median={self.quantile(0.5)!r})"

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile of the measurable norms (bin centre), or None if there are none.

        The rank is ``ceil(q * n)`` (at least 1): for ``q = 0.5`` and an even
        count that is the lower median, so with two updates the smaller one
        decides, and one outsized update among honest ones can never be it.
        """
        index = self._quantile_bin(q)
        return None if index is None else bin_centre(index)

    def quantile_ceiling(self, q: float) -> float | None:
        """An upper bound on the ``q``-quantile: the top edge of its bin (None if no norms).

        At most 19% above the true value, never below it (``inf`` if the
        quantile is in the overflow bin). A bound set from it can therefore
        never be lower than the same multiple of the exact quantile.
        """
        index = self._quantile_bin(q)
        return None if index is None else bin_ceiling(index)

    @property
    def measurable(self) -> int:
        """Number of measurable norms counted (zero and negligible ones left out)."""
        return self.total - self._counts.get(UNDERFLOW_BIN, 0)

    def _quantile_bin(self, q: float) -> int | None:
        if not 0.0 < q < 1.0:
            raise ValidationError(f"quantile must be in (0, 1), got {q!r}")
        measurable = self.measurable
        if measurable == 0:
            return None
        rank = max(1, math.ceil(q * measurable))
        seen = 0
        for index, count in self._counts.items():
            if index == UNDERFLOW_BIN:
                continue
            seen += count
            if seen >= rank:
                return index
        raise AssertionError("unreachable: ranks are bounded by the total")  # pragma: no cover

    # -- wire forms ------------------------------------------------------------------

    def to_json(self) -> dict[str, int]:
        """``{"bin": count}`` for occupied bins, sorted (stable bytes for equal histograms)."""
        return {str(index): count for index, count in self._counts.items()}

    @classmethod
    def from_json(cls, data: object, *, source: str) -> NormHistogram:
        """Parse :meth:`to_json` output from untrusted bytes; ``ValidationError`` if malformed."""
        if not isinstance(data, dict):
            raise ValidationError(f"{source}: norm histogram must be an object, got {data!r}")
        counts: dict[int, int] = {}
        for key, value in data.items():
            if not (isinstance(key, str) and key.isdigit()):
                raise ValidationError(f"{source}: norm histogram bin {key!r} is not an index")
            counts[int(key)] = value
        return cls(_check_counts(counts, f"{source}: norm histogram"))

    def to_vector(self) -> np.ndarray:
        """Dense float64 counts, one per bin: sums like the histograms do."""
        vector = np.zeros(NUM_BINS, np.float64)
        for index, count in self._counts.items():
            vector[index] = count
        return vector

    @classmethod
    def from_vector(cls, vector: np.ndarray) -> NormHistogram:
        """Rebuild from :meth:`to_vector` output (or a sum of such vectors)."""
        arr = np.asarray(vector, dtype=np.float64)
        if arr.shape != (NUM_BINS,):
            raise ValidationError(
                f"norm histogram vector has shape {arr.shape}, expected ({NUM_BINS},)"
            )
        if not (np.all(arr >= 0) and np.all(arr == np.rint(arr))):
            raise ValidationError("norm histogram vector must hold non-negative integer counts")
        return cls({int(i): int(arr[i]) for i in np.flatnonzero(arr)})
