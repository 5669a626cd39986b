"""Find a job by name: a built-in, ``package.module:ATTR`` or ``path/to/file.py:ATTR``.

User jobs live in the user's own file or package; Canopy imports them on demand,
so adding a job never means editing Canopy (docs/custom-job.md).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from edge.jobs.cifar10 import CIFAR10_MOBILE
from edge.jobs.hello import HELLO_MOBILE
from edge.jobs.spec import JobSpec
from edge.jobs.xor import XOR_MOBILE
from infra.errors import ConfigError

BUILTIN_JOBS: dict[str, JobSpec] = {
    job.name: job for job in (HELLO_MOBILE, XOR_MOBILE, CIFAR10_MOBILE)
}


def list_jobs() -> list[str]:
    """Names of the built-in jobs."""
    return sorted(BUILTIN_JOBS)


def _unknown(name_or_ref: str, reason: str) -> ConfigError:
    return ConfigError(
        f"job {name_or_ref!r}: {reason}. Built-in jobs: {', '.join(list_jobs())}; "
        "or give your own as package.module:ATTR or path/to/file.py:ATTR "
        "(see docs/custom-job.md)"
    )


def _import_file(path: Path, ref: str) -> ModuleType:
    if not path.is_file():
        raise _unknown(ref, f"file {path} does not exist")
    resolved = path.resolve()
    # A stable, unique module name per file, so two user files named job.py do not collide.
    name = "canopy_user_job_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise _unknown(ref, f"{path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, ConfigError):  # a JobSpec refusing itself already says why
            raise
        raise ConfigError(
            f"job {ref!r}: importing {path} failed with {type(exc).__name__}: {exc}; "
            "fix the job file (the chained traceback shows the line)"
        ) from exc
    return module


def _import_module(module_name: str, ref: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise _unknown(ref, f"module {module_name!r} not found ({exc})") from exc


def get_job(name_or_ref: str) -> JobSpec:
    """The ``JobSpec`` for a built-in name or a ``module:ATTR`` / ``file.py:ATTR`` reference.

    ``ATTR`` may be a ``JobSpec`` or a function with no arguments returning one.
    """
    if name_or_ref in BUILTIN_JOBS:
        return BUILTIN_JOBS[name_or_ref]
    target, sep, attr = name_or_ref.rpartition(":")
    if not sep or not target or not attr:
        raise _unknown(name_or_ref, "not a built-in job")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target), name_or_ref)
    else:
        module = _import_module(target, name_or_ref)
    if not hasattr(module, attr):
        raise _unknown(name_or_ref, f"{target} has no attribute {attr!r}")
    value = getattr(module, attr)
    if callable(value) and not isinstance(value, JobSpec):
        try:
            value = value()
        except ConfigError:
            raise
        except Exception as exc:  # the user's factory
            raise ConfigError(
                f"job {name_or_ref!r}: calling {target}:{attr}() failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(value, JobSpec):
        raise _unknown(
            name_or_ref, f"{target}:{attr} is a {type(value).__name__}, not an edge.jobs.JobSpec"
        )
    return value
