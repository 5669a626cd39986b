"""Find a job by name: a built-in, ``package.module:ATTR`` or ``path/to/file.py:ATTR``.

User jobs live in the user's own file or package; Canopy imports them on demand,
so adding a job never means editing Canopy (docs/custom-job.md).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class JobSource:
    """Where a job's code lives, so a model can be traced to the code that defined it."""

    reference: str  # what the user gave: a built-in name, module:ATTR or file.py:ATTR
    name: str  # the spec's declared name: what keys, gateways and reports use
    path: str | None  # the file (or module file) that defines it; None for built-ins
    sha256: str | None  # of that file's bytes

    def lineage(self) -> dict[str, str | None]:
        return {
            "job_reference": self.reference,
            "job_name": self.name,
            "job_file": self.path,
            "job_file_sha256": self.sha256,
        }


def job_source(name_or_ref: str, spec: JobSpec) -> JobSource:
    """The source of ``spec``, resolved from ``name_or_ref`` (built-ins have no file)."""
    if name_or_ref in BUILTIN_JOBS:
        return JobSource(reference=name_or_ref, name=spec.name, path=None, sha256=None)
    target = name_or_ref.rpartition(":")[0]
    if target.endswith(".py") or "/" in target or "\\" in target:
        path: Path | None = Path(target).resolve()
    else:
        module_file = getattr(sys.modules.get(target), "__file__", None)
        path = Path(module_file) if module_file else None
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path and path.is_file() else None
    return JobSource(
        reference=name_or_ref, name=spec.name, path=str(path) if path else None, sha256=digest
    )
