"""Import an object named ``package.module:ATTR`` or ``path/to/file.py:ATTR``.

This is how a user's own strategy reaches Canopy without editing it, the same
reference form jobs use (``edge.jobs.registry``; aggregation has its own copy of
the idea because it may not import ``edge``). Importing is the one side effect
in ``aggregation``: it runs the user's module once per process, when a run's
configuration is first validated.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from infra.errors import ConfigError

Complaint = Callable[[str], ConfigError]
"""Builds the caller's error from a reason, so messages name what was being looked up."""


def is_reference(text: str) -> bool:
    """Whether ``text`` has the ``target:ATTR`` form (registered names have no colon)."""
    target, sep, attr = text.rpartition(":")
    return bool(sep and target and attr)


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _import_file(path: Path, complain: Complaint, prefix: str) -> ModuleType:
    if not path.is_file():
        raise complain(f"file {path} does not exist")
    resolved = path.resolve()
    # A stable name per file, so two user files called strategy.py do not collide,
    # and a second lookup in the same process reuses the module instead of re-running it.
    name = prefix + hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise complain(f"{path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import_module(module_name: str, complain: Complaint) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise complain(f"module {module_name!r} not found") from exc
        raise  # the user's module exists but imports something missing: show that


def load_reference(reference: str, complain: Complaint, *, prefix: str) -> object:
    """The object ``reference`` names; ``ATTR`` may be dotted (``module:Outer.Inner``).

    Errors in the user's own module (a syntax error, a failing import inside it)
    propagate unchanged, with their traceback; a reference that names nothing
    raises ``complain(reason)``. ``prefix`` starts the synthetic module name of
    imported files (e.g. ``"canopy_user_strategy_"``).
    """
    if not is_reference(reference):
        raise complain("not of the form package.module:ATTR or path/to/file.py:ATTR")
    target, _, attr = reference.rpartition(":")
    if _is_file(target):
        module = _import_file(Path(target), complain, prefix)
    else:
        module = _import_module(target, complain)
    value: object = module
    for part in attr.split("."):
        if not hasattr(value, part):
            raise complain(f"{target} has no attribute {attr!r}")
        value = getattr(value, part)
    return value
