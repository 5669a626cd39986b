"""Serve Canopy's deployments (prefect.yaml) and the user's from one local runner process.

`canopy up` runs this; it is the local stand-in for a process work pool and
worker. Flow runs execute in subprocesses of this runner, with the runner's
environment (S3 endpoint, Prefect API URL) and working directory, forked from
a process that has already imported the flow (``flows.warm_start``).

``--user-deployments FILE`` (the stack's ``deployments.yaml``, written by
``canopy deploy``) is read at start and watched while the runner runs: a
deployment added or changed there is registered with Prefect and served within
a poll interval, so a user's job gets a deployment without restarting the
stack or interrupting the runs in progress.

Every deployment is served with the stack's ``leaf_mode`` when it sets none
(``CANOPY_EDGE_LEAF_MODE``: ``canopy up --edge-workers N`` runs leaves on the
``edge`` work pool, ``flows.edge_leaf``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from pathlib import Path

from prefect.exceptions import TerminationSignal
from prefect.runner import Runner

from flows.deployments import (
    DeploymentSpec,
    load_deployment_specs,
    load_user_deployments,
    served_parameters,
)
from flows.federated import federated_training
from flows.warm_start import use_warm_processes, uses_warm_processes, wait_until_warm
from infra.errors import CanopyError

log = logging.getLogger("canopy.serve")
RUN_LIMIT = 2  # flow runs at once: two cores
# How often the runner asks for scheduled runs. Prefect's default (10 s) is most of
# the wait between `prefect deployment run` and the flow starting; one small read
# of the API every half second is nothing to a local server.
QUERY_SECONDS = 0.5


async def _serve_spec(runner: Runner, spec: DeploymentSpec) -> None:
    if uses_warm_processes():
        # As a flow the runner holds in memory, so its runs fork from the warm
        # process (flows.warm_start) instead of re-importing the flow module.
        await runner.aadd_flow(
            federated_training,
            name=spec.name,
            description=spec.description,
            tags=spec.tags,
            parameters=served_parameters(spec),
        )
    else:  # Prefect's own path: each run imports the flow from its entrypoint, cold
        deployment = await federated_training.ato_deployment(
            name=spec.name,
            description=spec.description,
            tags=spec.tags,
            parameters=served_parameters(spec),
        )
        await runner.aadd_deployment(deployment)
    print(f"serving federated-training/{spec.name}", flush=True)


async def _serve_user_file(runner: Runner, path: Path, builtin: set[str]) -> None:
    """(Re-)register every deployment of the file (a broken file is logged, not fatal)."""
    try:
        specs = load_user_deployments(path)
    except (CanopyError, ValueError, OSError) as exc:  # ValueError: YAML and pydantic errors
        print(f"ignoring {path}: {exc}", flush=True)
        return
    for spec in specs:  # all of them: `canopy deploy` waits for a fresh registration
        if spec.name in builtin:
            print(f"ignoring {spec.name} in {path}: prefect.yaml has it", flush=True)
        else:
            await _serve_spec(runner, spec)


async def _watch(runner: Runner, path: Path, builtin: set[str], poll_s: float) -> None:
    """Re-read ``path`` whenever it changes, for as long as the runner runs."""
    seen = _stamp(path)
    while True:
        await asyncio.sleep(poll_s)
        stamp = _stamp(path)
        if stamp == seen:
            continue
        seen = stamp
        try:
            await _serve_user_file(runner, path, builtin)
        except Exception as exc:  # the API being briefly away must not stop the runner
            print(f"registering deployments from {path} failed: {exc!r}", flush=True)
            seen = None  # try again next poll


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


async def serve_deployments(
    user_file: Path | None = None, *, poll_s: float = 1.0, warm: bool = True
) -> None:
    """Serve prefect.yaml's deployments and, with ``user_file``, the user's.

    ``warm=False`` keeps Prefect's own cold ``spawn`` start, for comparison
    (benchmarks/round_speed.py measures both side by side).
    """
    ctx = use_warm_processes() if warm else None
    runner = Runner(limit=RUN_LIMIT, query_seconds=QUERY_SECONDS)
    builtin = load_deployment_specs()
    for spec in builtin:
        await _serve_spec(runner, spec)
    names = {spec.name for spec in builtin}
    watcher = None
    if user_file is not None:
        await _serve_user_file(runner, user_file, names)
        watcher = asyncio.create_task(_watch(runner, user_file, names, poll_s))
    if ctx is not None:
        waited = await asyncio.to_thread(wait_until_warm, ctx)
        print(f"flow-run processes warm (waited {waited:.1f}s for the fork server)", flush=True)
    print("runner ready", flush=True)
    try:
        await runner.start()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__)
    parser.add_argument(
        "--user-deployments",
        type=Path,
        default=None,
        help="YAML of `canopy deploy`'s deployments to serve too (watched for changes).",
    )
    parser.add_argument(
        "--cold-start",
        action="store_true",
        help="Start each flow run in a fresh interpreter (Prefect's default) instead of "
        "forking it from a process that has imported the flow: slower, for comparison.",
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve_deployments(args.user_deployments, warm=not args.cold_start))
    except (KeyboardInterrupt, TerminationSignal):
        log.info("runner stopped")


if __name__ == "__main__":
    main()
