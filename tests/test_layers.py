"""Layers that hold: every import in every package points down, never up.

    flows       the deployments, the CLI and the local stack (entry points)
    tasks       Prefect tasks and the pure round logic they wrap
    edge        devices, gateways, jobs, training, the simulator (no Prefect)
    aggregation pure math (nothing of ours but infra.errors)
    infra       settings, S3 store, keys, lineage, run state

Imports are read from the syntax tree (top-level, inside functions, and
``importlib.import_module("...")`` with a literal name), so a lazy import
cannot slip an upward dependency past the rule.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("aggregation", "infra", "edge", "tasks", "flows")

# package -> packages (ours or third-party top-level names) it must never import
FORBIDDEN: dict[str, frozenset[str]] = {
    "aggregation": frozenset({"infra", "edge", "tasks", "flows", "prefect"}),
    "infra": frozenset({"edge", "tasks", "flows", "aggregation"}),
    "edge": frozenset({"tasks", "flows", "prefect"}),
    "tasks": frozenset({"flows"}),
    "flows": frozenset(),
}
# the one door through the aggregation wall
ALLOWED_EXCEPTIONS: dict[str, frozenset[str]] = {"aggregation": frozenset({"infra.errors"})}


def imported_modules(source: str) -> set[str]:
    """Absolute module names a source file imports, however it imports them."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # the most specific name: `from infra import errors` is infra.errors
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def _breaks(package: str, module: str) -> bool:
    top = module.split(".")[0]
    if top not in FORBIDDEN[package]:
        return False
    allowed = ALLOWED_EXCEPTIONS.get(package, frozenset())
    return not any(module == a or module.startswith(f"{a}.") for a in allowed)


def violations(sources: Mapping[str, str]) -> list[str]:
    """``path: imports module`` for every import that points up a layer."""
    out = []
    for path, source in sorted(sources.items()):
        package = Path(path).parts[0]
        if package not in FORBIDDEN:
            continue
        for module in sorted(imported_modules(source)):
            if _breaks(package, module):
                out.append(f"{path}: imports {module}")
    return out


def package_sources(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    return {
        str(path.relative_to(REPO)): path.read_text()
        for package in packages
        for path in sorted((REPO / package).rglob("*.py"))
    }


def test_every_package_imports_only_downwards() -> None:
    sources = package_sources()
    assert len(sources) > 50, "the layer test found too few modules to be meaningful"
    assert violations(sources) == []


def test_nothing_outside_flows_imports_flows() -> None:
    """Only the deployment entry points (in flows/ itself) may import flows."""
    sources = package_sources(p for p in PACKAGES if p != "flows")
    upward = [
        f"{path}: imports {m}"
        for path, src in sources.items()
        for m in imported_modules(src)
        if m.split(".")[0] == "flows"
    ]
    assert upward == []


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        (
            "infra/x.py",
            "from edge.jobs import get_job\n",
            ["infra/x.py: imports edge.jobs.get_job"],
        ),
        ("infra/x.py", "def f():\n    import tasks.params\n", ["infra/x.py: imports tasks.params"]),
        (
            "infra/x.py",
            "import importlib\nimportlib.import_module('flows.cli')\n",
            ["infra/x.py: imports flows.cli"],
        ),
        ("edge/x.py", "from prefect import flow\n", ["edge/x.py: imports prefect.flow"]),
        ("tasks/x.py", "from flows import federated\n", ["tasks/x.py: imports flows.federated"]),
        ("aggregation/x.py", "from infra.errors import CanopyError\n", []),
        (
            "aggregation/x.py",
            "from infra.store import ObjectRef\n",
            ["aggregation/x.py: imports infra.store.ObjectRef"],
        ),
        ("aggregation/x.py", "from infra import errors\n", []),
        ("tasks/x.py", "from edge.jobs import get_job\nfrom .sibling import y\n", []),
        ("flows/x.py", "from tasks.params import TrainingParams\n", []),
    ],
)
def test_the_rule_catches_a_reverse_import(path: str, source: str, expected: list[str]) -> None:
    """The test of the test: a planted upward import is reported, a downward one is not."""
    assert violations({path: source}) == expected
