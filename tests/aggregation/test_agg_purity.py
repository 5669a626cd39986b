"""``aggregation`` stays pure: no orchestration, network or cloud SDK may leak into it.

Two independent checks. The subprocess one sees what importing the package really
pulls in (including transitively, through ``infra.errors`` say); the AST one names
the offending file and line, and also catches imports hidden inside functions.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import aggregation.partial

# Not ``aggregation.__file__``: under ``.venv/bin/pytest`` the test directory
# tests/aggregation/ (no __init__.py, by convention) is found first as a namespace
# package named ``aggregation``; submodules still resolve to the real package.
PACKAGE_DIR = Path(aggregation.partial.__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent

FORBIDDEN = frozenset(
    {
        "prefect",
        "boto3",
        "botocore",
        "aiobotocore",
        "s3fs",
        "moto",
        "httpx",
        "requests",
        "fastapi",
        "starlette",
        "uvicorn",
        # Not I/O, but the architecture table keeps torch out too: it costs seconds
        # to import in every aggregation worker and tensors cross as numpy.
        "torch",
    }
)

ALLOWED_THIRD_PARTY = frozenset({"numpy", "safetensors", "pydantic"})
ALLOWED_FIRST_PARTY = frozenset({"aggregation", "infra.errors"})


def test_importing_every_module_pulls_in_nothing_forbidden() -> None:
    # Prepare: a fresh interpreter, so modules other tests imported don't count
    script = (
        "import importlib, json, pkgutil, sys\n"
        "import aggregation\n"
        "assert aggregation.__file__, 'resolved the test directory, not the package'\n"
        "names = [m.name for m in pkgutil.walk_packages(aggregation.__path__, 'aggregation.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({'imported': names, 'modules': sorted(sys.modules)}))\n"
    )

    # Execute
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Assert
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"aggregation.partial", "aggregation.guards", "aggregation.strategies"} <= set(
        report["imported"]
    )
    leaked = sorted(m for m in report["modules"] if m.split(".")[0] in FORBIDDEN)
    assert not leaked, f"importing aggregation pulled in {leaked}"


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports, anywhere in it, with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def is_allowed(module: str) -> bool:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY or top == "__future__":
        return True
    return any(module == ok or module.startswith(ok + ".") for ok in ALLOWED_FIRST_PARTY)


def test_source_imports_only_stdlib_numpy_safetensors_pydantic_and_errors() -> None:
    # Prepare
    files = sorted(PACKAGE_DIR.rglob("*.py"))

    # Execute
    offenders = [
        f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {module}"
        for path in files
        for line, module in imports_of(path)
        if not is_allowed(module)
    ]

    # Assert
    assert len(files) >= 8
    assert not offenders, "\n".join(offenders)


def test_the_checker_itself_flags_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\n\ndef f():\n    from prefect import flow\n    import boto3\n")

    flagged = [module for _, module in imports_of(bad) if not is_allowed(module)]

    assert flagged == ["prefect", "boto3"]
