"""The aggregation tree: server, aggregator levels, leaf nodes.

Like NVIDIA FLARE's hierarchical edge tree, no node has more than ``width``
children, so fan-in per node stays bounded however many devices join. The tree
is pure data: the round flow runs one Prefect subflow per *level*, bottom up,
and each node in a level adds its children's partial aggregates.

Naming: leaves are ``leaf-{i}``, inner nodes ``agg-{level}-{j}`` (level 1 is just
above the leaves) and the top is ``root``. With ``depth=1`` the root's children
are the leaves themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class TreeShape(BaseModel):
    """Depth (levels below the root) and width (most children per node)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    depth: int = Field(default=2, ge=1, le=6, description="Levels below the root; 1 = flat.")
    width: int = Field(default=2, ge=1, le=256, description="Most children per node.")

    @property
    def num_leaves(self) -> int:
        return int(self.width**self.depth)


@dataclass(frozen=True)
class Node:
    """One node of the tree and the nodes whose partials it sums."""

    name: str
    level: int  # 0 = leaves, depth = root
    children: tuple[str, ...]


@dataclass(frozen=True)
class Tree:
    """Nodes by level, leaves first: the order the level subflows run in."""

    shape: TreeShape
    levels: tuple[tuple[Node, ...], ...]

    @property
    def leaves(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.levels[0])

    @property
    def root(self) -> Node:
        return self.levels[-1][0]


def leaf_name(i: int) -> str:
    return f"leaf-{i}"


def build_tree(shape: TreeShape) -> Tree:
    """Lay out a full tree; every node above the leaves has exactly ``width`` children."""
    leaves = tuple(Node(leaf_name(i), 0, ()) for i in range(shape.num_leaves))
    levels: list[tuple[Node, ...]] = [leaves]
    for level in range(1, shape.depth + 1):
        below = levels[-1]
        if level == shape.depth:
            names = ["root"]
        else:
            names = [f"agg-{level}-{j}" for j in range(len(below) // shape.width)]
        nodes = tuple(
            Node(name, level, tuple(c.name for c in below[j * shape.width : (j + 1) * shape.width]))
            for j, name in enumerate(names)
        )
        levels.append(nodes)
    return Tree(shape=shape, levels=tuple(levels))
