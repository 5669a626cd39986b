"""Robust by default: one poisoned update cannot move the round's mean beyond a bound.

The leaf's defaults (adaptive norm bound, the task's weight cap) against the three
poisons found on main: 1000x the honest norm, a finite update of norm 7e30, and an
honest update claiming 10^9 samples; in round 0, where a leaf has only its own
updates to judge by, also a leaf whose only update (or every update) is poisoned,
which round 0's check across leaves bounds by the whole round's median. And the
other side of the bargain: honest rounds are summed exactly as without the guard.

``run_round`` wires the pure pieces as the flow does: leaf collectors, then the
check across leaves (``AdaptiveNormBound.check_leaves``, ``PartialAggregate.scaled``)
on the finished leaf partials, then the root's sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aggregation.accumulator import Accumulator
from aggregation.clipping import AdaptiveNormBound, LeafScale, NormBoundState
from aggregation.collector import ACCEPTED, LeafCollector
from aggregation.guards import GuardConfig, check_update
from aggregation.partial import PartialAggregate
from aggregation.tensors import TensorDict, TensorSpec
from aggregation.topology import TreeShape, build_tree

SPEC = {"conv.weight": TensorSpec((4, 3), "float32"), "fc.bias": TensorSpec((5,), "float32")}
CAP = 1000  # the task's max_num_samples
POLICY = AdaptiveNormBound()
MULTIPLIER = POLICY.multiplier
ROBUST = settings(max_examples=80, deadline=None)


@dataclass(frozen=True)
class Update:
    device: str
    tensors: TensorDict
    weight: float
    leaf: int

    @property
    def norm(self) -> float:
        return math.sqrt(
            sum(float(np.sum(a.astype(np.float64) ** 2)) for a in self.tensors.values())
        )


def direction(rng: np.random.Generator) -> TensorDict:
    """A random unit-norm update."""
    raw = {n: rng.standard_normal(s.shape) for n, s in SPEC.items()}
    norm = math.sqrt(sum(float(np.sum(a**2)) for a in raw.values()))
    return {n: a / norm for n, a in raw.items()}


def scaled(unit: TensorDict, norm: float) -> TensorDict:
    return {n: (a * norm).astype(np.float32) for n, a in unit.items()}


@dataclass(frozen=True)
class Round:
    root: PartialAggregate
    collectors: list[LeafCollector]
    partials: list[PartialAggregate]  # as the leaves made them
    checked: list[PartialAggregate]  # after round 0's check across leaves: what the tree adds
    scales: dict[int, LeafScale]  # the check's verdicts, by leaf


def run_round(
    updates: list[Update],
    *,
    leaves: int,
    state: NormBoundState,
    adaptive: AdaptiveNormBound | None = POLICY,
    cap: float | None = CAP,
) -> Round:
    """Offer the updates (in order) to their leaves' collectors, check across leaves, sum."""
    collectors = [
        LeafCollector(
            spec=SPEC,
            task_id="t",
            model_version="v",
            selected=frozenset(u.device for u in updates),
            guard=GuardConfig(max_weight=cap),
            norm_state=state,
            adaptive=adaptive,
        )
        for _ in range(leaves)
    ]
    for u in updates:
        collectors[u.leaf].offer(
            device_id=u.device,
            task_id="t",
            model_version="v",
            num_samples=u.weight,  # type: ignore[arg-type]  # the wire may carry a float
            tensors=u.tensors,
            metrics={"loss": 1.0},
        )
    partials = [c.result() for c in collectors]
    scales = POLICY.check_leaves(
        {i: c.norm_summary(p) for i, (c, p) in enumerate(zip(collectors, partials, strict=True))}
    )
    checked = [p.scaled(scales[i].factor) if i in scales else p for i, p in enumerate(partials)]
    root = PartialAggregate.zero()
    for partial in checked:
        root = root + partial
    return Round(root, collectors, partials, checked, scales)


def flat(mean: TensorDict) -> np.ndarray:
    return np.concatenate([mean[n].astype(np.float64).reshape(-1) for n in sorted(mean)])


@st.composite
def honest_cohorts(draw: st.DrawFn, spread: float) -> tuple[list[Update], float, int]:
    """Honest updates with norms in [m, spread * m), on 1-3 leaves; returns (updates, m, leaves)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m = draw(st.floats(1e-3, 1e3))
    leaves = draw(st.integers(1, 3))
    n = draw(st.integers(1, 12))
    updates = [
        Update(
            device=f"honest-{i}",
            tensors=scaled(direction(rng), m * draw(st.floats(1.0, spread, exclude_max=True))),
            weight=float(draw(st.integers(1, CAP))),
            leaf=draw(st.integers(0, leaves - 1)),
        )
        for i in range(n)
    ]
    return updates, m, leaves


@ROBUST
@given(
    cohort=honest_cohorts(spread=2.0),
    kind=st.sampled_from(["1000x", "7e30", "huge-weight"]),
    carried=st.none() | st.floats(1.0, 2.0),
    data=st.data(),
)
def test_one_poisoned_update_moves_the_mean_by_at_most_its_clipped_share(
    cohort: tuple[list[Update], float, int],
    kind: str,
    carried: float | None,
    data: st.DataObject,
) -> None:
    # Prepare: honest updates; one poison at a random place in the arrival order,
    # in round 0 (warm-up) or with a bound carried from the previous round
    honest, m, leaves = cohort
    state = NormBoundState() if carried is None else NormBoundState(estimate=carried * m)
    leaf = data.draw(st.integers(0, leaves - 1))
    if carried is None:  # round 0: a leaf must have an honest update to compare with
        assume(any(u.leaf == leaf for u in honest))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if kind == "huge-weight":
        poison = Update("poison", scaled(direction(rng), m), 1e9, leaf)
    else:
        # the worst direction: straight against the honest mean (or random, when it is 0)
        honest_mean, _ = run_round(honest, leaves=leaves, state=state).root.finalize()
        against = {n: -a.astype(np.float64) for n, a in honest_mean.items()}
        unit = against if np.linalg.norm(flat(against)) > 0 else direction(rng)
        unit_norm = float(np.linalg.norm(flat(unit)))
        size = 1000 * 2 * m if kind == "1000x" else 7e30
        poison_tensors = scaled({n: a / unit_norm for n, a in unit.items()}, size)
        poison = Update("poison", poison_tensors, float(data.draw(st.integers(1, CAP))), leaf)
    at = data.draw(st.integers(0, len(honest)))
    poisoned = [*honest[:at], poison, *honest[at:]]

    # Execute
    clean = run_round(honest, leaves=leaves, state=state)
    clean_root = clean.root
    poisoned_round = run_round(poisoned, leaves=leaves, state=state)
    root, collectors = poisoned_round.root, poisoned_round.collectors

    # Assert: honest updates are never clipped, with or without the poison; the leaf
    # with the poison has an honest reference, so the check across leaves stays out
    assert all(not c.clipped for c in clean.collectors) and not clean.scales
    assert not poisoned_round.scales
    mean_h = flat(clean_root.finalize()[0])
    mean_p = flat(root.finalize()[0])
    if kind == "huge-weight":
        assert {r: n for c in collectors for r, n in c.rejected.items()} == {"weight-cap": 1}
        np.testing.assert_array_equal(mean_p, mean_h)  # as if it never came
        return
    assert sum(c.clipped["adaptive-norm"] for c in collectors) == 1  # the poison, only
    bound = collectors[leaf].norm_bound
    assert bound is not None and bound <= MULTIPLIER * 2 * m * (1 + 1e-9)
    share = poison.weight / (clean_root.weight + poison.weight)
    limit = share * (bound + float(np.linalg.norm(mean_h)))
    shift = float(np.linalg.norm(mean_p - mean_h))
    assert shift <= limit * (1 + 1e-4) + 1e-6 * m
    # and the guard is what holds it: without it the same poison breaks the limit
    unguarded = run_round(poisoned, leaves=leaves, state=state, adaptive=None).root
    with np.errstate(over="ignore"):
        loose = float(np.linalg.norm(flat(unguarded.finalize()[0]) - mean_h))
    assert loose > limit


@ROBUST
@given(cohort=honest_cohorts(spread=3.9), carried=st.none() | st.floats(1.0, 2.0))
def test_honest_rounds_are_summed_exactly_as_without_the_guard(
    cohort: tuple[list[Update], float, int], carried: float | None
) -> None:
    # Prepare: norms spread by less than the multiplier, so the bound is never reached
    honest, m, leaves = cohort
    state = NormBoundState() if carried is None else NormBoundState(estimate=carried * m)

    # Execute
    result = run_round(honest, leaves=leaves, state=state)
    root, collectors, partials = result.root, result.collectors, result.partials

    # Assert: bit for bit the plain sum of the checked updates (no bound), leaf by leaf,
    # and round 0's check across leaves scales nothing
    assert not result.scales and result.checked == partials
    for index, (collector, partial) in enumerate(zip(collectors, partials, strict=True)):
        acc = Accumulator(SPEC)
        for u in honest:
            if u.leaf == index:
                acc.add_checked(
                    check_update(
                        u.tensors,
                        spec=SPEC,
                        device_id=u.device,
                        weight=u.weight,
                        metrics={"loss": 1.0},
                    )
                )
        assert partial == acc.result()
        assert not collector.clipped and not collector.rejected
    assert root.count == len(honest) and root.norms.total == len(honest)


def test_the_bound_follows_training_across_rounds_and_clips_on_arrival() -> None:
    """Six rounds of honest updates whose norms shrink by 30% a round: the root carries
    the median forward, nothing honest is clipped, and in the last round a poisoned
    update is clipped the moment it arrives, even first and even alone in its leaf."""
    rng = np.random.default_rng(3)
    policy = POLICY
    state = NormBoundState()
    m = 5.0
    for rnd in range(6):
        honest = [
            Update(f"d{i}", scaled(direction(rng), m * rng.uniform(1.0, 1.5)), 50.0, i % 3)
            for i in range(12)
        ]
        result = run_round(honest, leaves=4, state=state)  # leaf 3 gets nobody
        root, collectors = result.root, result.collectors
        assert all(not c.clipped for c in collectors) and not result.scales, rnd
        median = sorted(u.norm for u in honest)[5]
        state = policy.next_state(state, root.norms)
        assert state.rounds == rnd + 1
        assert state.estimate == pytest.approx(median, rel=0.1)
        m *= 0.7

    lone = LeafCollector(
        spec=SPEC, task_id="t", model_version="v", selected=frozenset({"p"}), norm_state=state
    )
    outcome = lone.offer(
        device_id="p",
        task_id="t",
        model_version="v",
        num_samples=50,
        tensors=scaled(direction(rng), 1000 * m),
        metrics={},
    )
    assert outcome == ACCEPTED and lone.clipped == {"adaptive-norm": 1} and lone.waiting == 0
    mean, _ = lone.result().finalize()
    assert np.linalg.norm(flat(mean)) == pytest.approx(policy.bound(state), rel=1e-5)


def test_round_zero_bounds_a_leaf_whose_only_update_is_poisoned() -> None:
    """The leaf cannot tell (its only update is its own reference), but the check across
    leaves can: the poison is clipped to the round's bound, exactly, before the tree adds."""
    rng = np.random.default_rng(0)
    honest = [
        Update(f"h{i}", scaled(direction(rng), rng.uniform(1.0, 2.0)), 10.0, i % 2)
        for i in range(8)
    ]
    poison = Update("p", scaled(direction(rng), 1e6), 10.0, 2)

    result = run_round([*honest, poison], leaves=3, state=NormBoundState())

    lone = result.collectors[2]
    assert not lone.clipped  # the leaf alone could not judge it ...
    assert lone.norm_bound == pytest.approx(MULTIPLIER * poison.norm, rel=1e-6)
    assert list(result.scales) == [2]  # ... the round can
    verdict = result.scales[2]
    median = sorted(u.norm for u in [*honest, poison])[4]  # the round's lower median (5 of 9)
    assert MULTIPLIER * median < verdict.bound <= MULTIPLIER * median * 2**0.25
    assert verdict.updates == 1 and verdict.factor == pytest.approx(verdict.bound / poison.norm)
    bounded, _ = result.checked[2].finalize()  # the lone update as the tree adds it
    assert float(np.linalg.norm(flat(bounded))) == pytest.approx(verdict.bound, rel=1e-5)
    assert result.checked[:2] == result.partials[:2]  # honest leaves untouched
    assert result.root.count == 9 and result.root.norms.total == 9


@ROBUST
@given(
    cohort=honest_cohorts(spread=2.0),
    kind=st.sampled_from(["1000x", "7e30"]),
    poisons=st.integers(1, 4),
    data=st.data(),
)
def test_round_zero_bounds_a_leaf_all_of_whose_updates_are_poisoned(
    cohort: tuple[list[Update], float, int], kind: str, poisons: int, data: st.DataObject
) -> None:
    # Prepare: honest leaves, and one more leaf that gets nothing but poison, straight
    # against the honest mean; the honest updates are the round's majority
    honest, m, leaves = cohort
    assume(poisons < len(honest))
    state = NormBoundState()
    honest_mean, _ = run_round(honest, leaves=leaves + 1, state=state).root.finalize()
    mean_h = flat(honest_mean)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    against = {n: -a.astype(np.float64) for n, a in honest_mean.items()}
    unit = against if np.linalg.norm(mean_h) > 0 else direction(rng)
    unit_norm = float(np.linalg.norm(flat(unit)))
    size = 1000 * 2 * m if kind == "1000x" else 7e30
    poison = [
        Update(
            f"poison-{i}",
            scaled({n: a / unit_norm for n, a in unit.items()}, size * (1 + i / 10)),
            float(data.draw(st.integers(1, CAP))),
            leaves,
        )
        for i in range(poisons)
    ]
    order = data.draw(st.permutations([*honest, *poison]))

    # Execute
    result = run_round(list(order), leaves=leaves + 1, state=state)

    # Assert: the poisoned leaf could not judge its updates, the round could: only that
    # leaf is scaled, and it counts every poison once
    assert not result.collectors[leaves].clipped
    assert list(result.scales) == [leaves]
    verdict = result.scales[leaves]
    assert verdict.updates == poisons and verdict.bound <= MULTIPLIER * 2 * m * 2**0.25
    assert result.checked[:leaves] == result.partials[:leaves]
    # every poison pulls at most the round's bound: the mean moves by at most the
    # poisons' weight share times (bound + |honest mean|)
    mean_p = flat(result.root.finalize()[0])
    share = sum(u.weight for u in poison) / result.root.weight
    limit = share * (verdict.bound + float(np.linalg.norm(mean_h)))
    assert float(np.linalg.norm(mean_p - mean_h)) <= limit * (1 + 1e-4) + 1e-6 * m
    # and the check is what holds it: the leaf partials as the leaves made them break it
    unchecked = PartialAggregate.zero()
    for partial in result.partials:
        unchecked = unchecked + partial
    with np.errstate(over="ignore"):
        loose = float(np.linalg.norm(flat(unchecked.finalize()[0]) - mean_h))
    assert loose > limit


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_the_check_runs_before_the_tree_adds_so_any_depth_gives_the_same_round(
    depth: int,
) -> None:
    """The check needs each leaf's partial on its own (once an aggregator has added a
    poisoned leaf to honest ones, nothing in the sum says which leaf it was), so it
    runs on the leaf partials; every level above just adds the checked partials."""
    rng = np.random.default_rng(7)
    tree = build_tree(TreeShape(depth=depth, width=2))
    leaves = len(tree.leaves)
    honest = [
        Update(f"h{i}", scaled(direction(rng), rng.uniform(1.0, 2.0)), 20.0, i % (leaves - 1 or 1))
        for i in range(3 * leaves)
    ]
    poison = Update("p", scaled(direction(rng), 5e3), 20.0, leaves - 1)
    result = run_round([*honest, poison], leaves=leaves, state=NormBoundState())
    assert list(result.scales) == [leaves - 1]
    by_name = dict(zip(tree.leaves, result.checked, strict=True))

    # Execute: each level adds its children's partials, as the flow's levels do
    for level in tree.levels[1:]:
        for node in level:
            total = PartialAggregate.zero()
            for child in node.children:
                total = total + by_name[child]
            by_name[node.name] = total

    # Assert: the same round as the flat sum, and the poison bounded within it
    root = by_name["root"]
    assert root.count == result.root.count == len(honest) + 1
    assert root.norms == result.root.norms
    np.testing.assert_allclose(
        flat(root.finalize()[0]), flat(result.root.finalize()[0]), rtol=1e-9, atol=1e-12
    )
    bound = result.scales[leaves - 1].bound
    assert bound == POLICY.round_bound(root.norms)
    poisoned_leaf, _ = result.checked[leaves - 1].finalize()
    assert float(np.linalg.norm(flat(poisoned_leaf))) == pytest.approx(bound, rel=1e-5)


class TestCollector:
    def offer(self, collector: LeafCollector, device: str, norm: float, weight: float = 10) -> str:
        values = np.zeros(12, np.float32)
        values[0] = norm
        return collector.offer(
            device_id=device,
            task_id="t",
            model_version="v",
            num_samples=weight,  # type: ignore[arg-type]
            tensors={"conv.weight": values.reshape(4, 3), "fc.bias": np.zeros(5, np.float32)},
            metrics={},
        )

    def collector(self, **kwargs: object) -> LeafCollector:
        return LeafCollector(
            spec=SPEC,
            task_id="t",
            model_version="v",
            selected=frozenset(f"d{i}" for i in range(20)),
            **kwargs,  # type: ignore[arg-type]
        )

    def test_round_zero_holds_the_first_updates_until_the_bound_is_known(self) -> None:
        c = self.collector()

        answers = [self.offer(c, f"d{i}", norm) for i, norm in enumerate([2.0, 1.0, 900.0, 3.0])]

        assert answers == [ACCEPTED] * 4 and c.waiting == 4 and c.norm_bound is None
        assert self.offer(c, "d4", 4.0) == ACCEPTED  # the fifth fixes the bound: 4 x median 3
        assert c.waiting == 0 and c.norm_bound == pytest.approx(12.0)
        assert c.clipped == {"adaptive-norm": 1}  # the 900
        assert self.offer(c, "d5", 100.0) == ACCEPTED and c.clipped["adaptive-norm"] == 2
        partial = c.result()
        assert partial.count == 6 and partial.norms.total == 6
        assert partial.sums["conv.weight"][0, 0] == pytest.approx(10 * (2 + 1 + 12 + 3 + 4 + 12))

    def test_zero_updates_are_summed_at_once_and_do_not_set_the_bound(self) -> None:
        c = self.collector()

        self.offer(c, "d0", 0.0)
        self.offer(c, "d1", 2.0)

        assert c.waiting == 1
        partial = c.result()
        assert partial.count == 2 and c.norm_bound == pytest.approx(8.0)

    def test_an_explicit_max_norm_overrides_the_adaptive_bound(self) -> None:
        c = self.collector(guard=GuardConfig(max_norm=5.0), norm_state=NormBoundState(estimate=1))

        self.offer(c, "d0", 10.0)

        assert c.norm_bound == 5.0 and c.waiting == 0 and c.clipped == {"norm-bound": 1}

    def test_the_carried_bound_applies_from_the_first_update(self) -> None:
        c = self.collector(norm_state=NormBoundState(estimate=1.0))

        self.offer(c, "d0", 10.0)
        self.offer(c, "d1", 3.0)

        assert c.norm_bound == 4.0 and c.waiting == 0 and c.clipped == {"adaptive-norm": 1}

    def test_adaptive_none_sums_as_sent(self) -> None:
        c = self.collector(adaptive=None)

        self.offer(c, "d0", 1e6)

        assert c.norm_bound is None and not c.clipped
        assert c.result().sums["conv.weight"][0, 0] == 1e7

    def test_the_weight_cap_is_counted_by_reason(self) -> None:
        c = self.collector(guard=GuardConfig(max_weight=100))

        assert self.offer(c, "d0", 1.0, weight=1e9) == "weight-cap"
        assert self.offer(c, "d0", 1.0, weight=100) == ACCEPTED  # its honest retry counts

        assert dict(c.rejected) == {"weight-cap": 1}
        assert "claims 1e+09 samples" in c.rejection_examples["weight-cap"]
        assert c.result().weight == 100.0
