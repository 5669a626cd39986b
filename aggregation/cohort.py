"""Who trains in a round: cohort sampling with over-selection, and when to stop waiting.

Cross-device FL over-selects (Bonawitz et al., "Towards Federated Learning at
Scale", 2019): ask ~30% more devices than the round needs, close the round when
``cohort_size`` have reported, and let stragglers' late results be refused. The
sampling is a pure function of (registered ids, seed, round), so a resumed run
picks the same cohort for the same round and any node can recompute it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence


def _rank(device_id: str, seed: int, rnd: int, purpose: str) -> bytes:
    key = f"{seed}:{rnd}:{device_id}" if not purpose else f"{purpose}:{seed}:{rnd}:{device_id}"
    return hashlib.sha256(key.encode()).digest()


def select_cohort(
    registered: Iterable[str],
    *,
    cohort_size: int,
    over_selection: float,
    seed: int,
    rnd: int,
    purpose: str = "",
) -> list[str]:
    """Pick ``ceil(cohort_size * over_selection)`` devices, or all when fewer are registered.

    Ranking each id by a keyed hash (instead of ``random.sample`` over a list)
    makes the choice independent of registry order and stable when unrelated
    devices enrol or leave. ``purpose`` (e.g. ``"evaluate"``) draws an
    independent cohort for another task of the same round.
    """
    if cohort_size < 1:
        raise ValueError(f"cohort_size must be >= 1, got {cohort_size}")
    if over_selection < 1.0:
        raise ValueError(f"over_selection must be >= 1.0, got {over_selection}")
    wanted = math.ceil(cohort_size * over_selection)
    ids = sorted(set(registered))
    ranked = sorted(ids, key=lambda d: _rank(d, seed, rnd, purpose))
    return sorted(ranked[:wanted])


def reports_needed(*, cohort_size: int, selected: int) -> int:
    """Reports that close a round early: the cohort, or everyone selected if fewer."""
    return min(cohort_size, selected)


def group_by_leaf(
    devices: Sequence[str], leaves: Sequence[str], route: Callable[[str, Sequence[str]], str]
) -> dict[str, list[str]]:
    """Place each selected device on the leaf its id routes to (every leaf present)."""
    out: dict[str, list[str]] = {leaf: [] for leaf in leaves}
    for device in devices:
        out[route(device, leaves)].append(device)
    return out


def pace_seconds(
    registered: int, *, polls_per_second: float, floor: float = 0.5, ceiling: float = 30.0
) -> float:
    """How long devices should wait between polls so the fleet stays within a poll budget.

    Pace steering (Bonawitz et al.): with N devices polling every T seconds the
    gateways see N/T requests per second, so T = N / budget keeps that load flat
    as the fleet grows, while a small fleet still hears about a new round fast.
    """
    if polls_per_second <= 0:
        raise ValueError(f"polls_per_second must be > 0, got {polls_per_second}")
    return min(ceiling, max(floor, registered / polls_per_second))
