"""Flow runs forked from a warm process, so a deployment run starts in tenths of a second.

Prefect's runner starts each flow run in a fresh ``spawn`` subprocess, which
imports Prefect, torch and the flow module again: about 5 s of the time from
`prefect deployment run` to round 0 open on this machine (issue 11). Python's
``forkserver`` start method keeps one single-threaded process that has
imported those modules once and forks a child per run: the child starts with
everything loaded and shares the imported pages with its parent.

The runner calls ``prefect.flow_engine.run_flow_in_subprocess`` for flows it
holds in memory (``Runner.aadd_flow``). That function asks the ``multiprocessing``
module it imported for the ``spawn`` context; ``use_warm_processes`` hands it a
stand-in whose contexts are all the preloading ``forkserver``. Everything else
(the pickled call, environment, signals, control channel, cancellation) stays
Prefect's own. Forking from the server is safe where forking the runner would
not be: the server runs no threads and no event loop.
"""

from __future__ import annotations

import copyreg
import importlib
import multiprocessing
import multiprocessing.forkserver
import pickle
import sys
import time
from collections.abc import Sequence
from multiprocessing.context import BaseContext
from typing import Any

import prefect.flow_engine
from prefect import Flow

# What every Canopy flow run imports before its first round: the engine, the flow
# module (Prefect, boto3, numpy; no torch, so the runner that holds it stays light)
# and what its first tasks import to build, check and evaluate a model (torch).
# ExecuTorch is left out: only ExecuTorch runs load it.
DEFAULT_PRELOAD = (
    "prefect.flow_engine",
    "flows.federated",
    "edge.training.state",
    "edge.training.validate",
    "edge.training.evaluate",
)


class _WarmContexts:
    """``multiprocessing`` as ``prefect.flow_engine`` sees it: every context is ``ctx``."""

    def __init__(self, ctx: BaseContext) -> None:
        self._ctx = ctx

    def get_context(self, method: str | None = None) -> BaseContext:
        return self._ctx

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


def use_warm_processes(preload: Sequence[str] = DEFAULT_PRELOAD) -> BaseContext:
    """Make the runner's flow-run subprocesses forks of a server that imported ``preload``.

    Call it once in the runner process, before the runner starts a run. The
    server starts now and imports ``preload`` while the runner registers its
    deployments, so even the first run finds it warm.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    copyreg.pickle(Flow, _reduce_flow)
    multiprocessing.forkserver.ensure_running()
    prefect.flow_engine.multiprocessing = _WarmContexts(ctx)  # type: ignore[assignment]
    return ctx


def wait_until_warm(ctx: BaseContext) -> float:
    """Block until the fork server has imported its preload; seconds waited.

    The server answers its first fork only after the imports, so one child that
    exits at once is the readiness probe.
    """
    t0 = time.monotonic()
    probe = ctx.Process(target=_nothing)  # type: ignore[attr-defined]
    probe.start()
    probe.join()
    return time.monotonic() - t0


def _nothing() -> None:
    """The readiness probe's whole life."""


def uses_warm_processes() -> bool:
    """Whether ``use_warm_processes`` is in effect in this process."""
    return isinstance(prefect.flow_engine.multiprocessing, _WarmContexts)


def _flow_at(module: str, name: str) -> Flow[Any, Any]:
    """The flow object a module defines: how a warm child gets it back by name."""
    found = getattr(importlib.import_module(module), name)
    if not isinstance(found, Flow):
        raise TypeError(f"{module}.{name} is a {type(found).__name__}, not a Prefect flow")
    return found


def _reduce_flow(flow: Flow[Any, Any]) -> Any:
    """Pickle a module-level flow by reference, any other one as before.

    cloudpickle pickles ``flow.fn`` by value (the module's attribute of that name
    is the ``Flow``, not the function), with only the globals its code names, and
    the child's parameter validation then cannot resolve the postponed
    annotations (``TreeShape``). By reference, the child takes the flow from the
    module the fork server has already imported.
    """
    module_name = getattr(flow.fn, "__module__", None)
    module = sys.modules.get(module_name or "")
    for name, value in vars(module).items() if module is not None else ():
        if value is flow:
            return _flow_at, (module_name, name)
    return flow.__reduce_ex__(pickle.DEFAULT_PROTOCOL)
