"""Pure round planning: tree layout, cohort sampling, and a leaf's intake."""

from __future__ import annotations

import numpy as np
import pytest

from aggregation.cohort import group_by_leaf, reports_needed, select_cohort
from aggregation.collector import ACCEPTED, DUPLICATE, LeafCollector
from aggregation.guards import GuardConfig
from aggregation.tensors import TensorSpec
from aggregation.topology import TreeShape, build_tree
from edge.routing import leaf_for_device


@pytest.mark.parametrize(("depth", "width"), [(1, 1), (1, 4), (2, 2), (3, 2), (2, 5)])
def test_tree_has_bounded_fan_in_and_one_root(depth: int, width: int) -> None:
    tree = build_tree(TreeShape(depth=depth, width=width))
    assert len(tree.leaves) == width**depth
    assert len(tree.levels) == depth + 1
    assert tree.root.name == "root" and tree.root.level == depth
    for level in tree.levels[1:]:
        below = [c for node in level for c in node.children]
        assert all(len(node.children) <= width for node in level)
        # every node of the level below has exactly one parent
        assert sorted(below) == sorted(n.name for n in tree.levels[level[0].level - 1])


def test_cohort_is_deterministic_over_selected_and_order_free() -> None:
    ids = [f"dev-{i}" for i in range(100)]
    a = select_cohort(ids, cohort_size=10, over_selection=1.3, seed=1, rnd=4)
    b = select_cohort(reversed(ids), cohort_size=10, over_selection=1.3, seed=1, rnd=4)
    assert a == b and len(a) == 13 and set(a) <= set(ids)
    assert select_cohort(ids, cohort_size=10, over_selection=1.3, seed=1, rnd=5) != a
    assert select_cohort(ids[:5], cohort_size=10, over_selection=1.3, seed=1, rnd=4) == ids[:5]
    assert reports_needed(cohort_size=10, selected=5) == 5


def test_cohort_refuses_bad_sizes() -> None:
    with pytest.raises(ValueError, match="cohort_size"):
        select_cohort(["a"], cohort_size=0, over_selection=1.3, seed=0, rnd=0)
    with pytest.raises(ValueError, match="over_selection"):
        select_cohort(["a"], cohort_size=1, over_selection=0.5, seed=0, rnd=0)


def test_group_by_leaf_uses_routing() -> None:
    leaves = ["leaf-0", "leaf-1", "leaf-2"]
    groups = group_by_leaf([f"d{i}" for i in range(30)], leaves, leaf_for_device)
    assert sum(len(g) for g in groups.values()) == 30
    for leaf, devices in groups.items():
        assert all(leaf_for_device(d, leaves) == leaf for d in devices)


def _collector(**kw: object) -> LeafCollector:
    spec = {"w": TensorSpec((2,), "float32")}
    return LeafCollector(
        spec=spec, task_id="t1", model_version="v1", selected=frozenset({"a", "b", "c"}), **kw
    )  # type: ignore[arg-type]


def _offer(c: LeafCollector, device: str, values: list[float], **kw: object) -> str:
    args: dict[str, object] = {
        "device_id": device,
        "task_id": "t1",
        "model_version": "v1",
        "num_samples": 2,
        "tensors": {"w": np.array(values, dtype=np.float32)},
        "metrics": {"loss": 1.0},
    }
    args.update(kw)
    return c.offer(**args)  # type: ignore[arg-type]


def test_leaf_counts_first_update_per_device_and_refuses_the_rest() -> None:
    c = _collector()
    assert _offer(c, "a", [1.0, 2.0]) == ACCEPTED
    assert _offer(c, "a", [9.0, 9.0]) == DUPLICATE
    assert _offer(c, "z", [1.0, 1.0]) == "not-selected"
    assert _offer(c, "b", [1.0, 1.0], task_id="old") == "wrong-task"
    assert _offer(c, "b", [1.0, 1.0], model_version="v0") == "stale-model"
    assert _offer(c, "b", [float("nan"), 1.0]) == "non-finite"
    assert _offer(c, "b", [1.0, 1.0], num_samples=0) == "bad-weight"
    assert _offer(c, "c", [3.0, 4.0], num_samples=6) == ACCEPTED
    mean, metrics = c.result().finalize()
    np.testing.assert_allclose(mean["w"], [(2 * 1 + 6 * 3) / 8, (2 * 2 + 6 * 4) / 8])
    assert metrics["loss"] == pytest.approx(1.0)
    assert c.reported == {"a", "c"} and c.duplicates == 1
    assert dict(c.rejected) == {
        "not-selected": 1,
        "wrong-task": 1,
        "stale-model": 1,
        "non-finite": 1,
        "bad-weight": 1,
    }
    assert "tensor 'w'" in c.rejection_examples["non-finite"]


def test_leaf_with_norm_bound_rejects_large_updates() -> None:
    c = _collector(guard=GuardConfig(max_norm=1.0, on_norm_exceeded="reject"))
    assert _offer(c, "a", [3.0, 4.0]) == "norm-bound"
    assert c.result().is_zero
