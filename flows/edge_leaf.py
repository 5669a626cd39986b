"""The leaf level on the ``edge`` work pool: one ``edge-leaf`` flow run per leaf and round.

    r0000-level-0-leaves                   (leaf-level subflow, central flow process)
      close-round                          (task, as in-process: counts, closes)
      edge-leaf/edge-leaf x L              (flow runs on edge workers, children of the
                                            leaf-level run in the UI)
        collect-leaf                       (the same task as in-process: tasks.leaf)

With ``leaf_mode="edge-pool"`` the round's leaf-level subflow starts every
leaf's collection as a run of the ``edge-leaf`` deployment (``run_deployment``,
linked as a subflow so the tree stays whole in the UI) on the ``edge`` work
pool, whose process workers sit beside the gateways. Device updates then go
from the gateways to S3 to the leaf's worker and never to the central flow:
what crosses back is one small JSON per leaf (its ``LeafOutcome``, under
``infra.keys.leaf_outcome_key``), since Prefect's results are no store.

The leaf's code path is ``tasks.leaf.collect_leaf``, exactly as in-process, so
its partial is the same bytes. This module is what a worker imports for every
leaf run (one fresh process per run), so it imports no torch and no job
registry: a leaf run starts in the time Prefect itself takes to import.

A leaf run that fails, crashes or is cancelled fails the round loudly
(``EdgeLeafError``): the round is not committed and resuming the run by its id
redoes it, as with an in-process leaf. A run no worker picks up within
``PICKUP_TIMEOUT_S``, or that outlives the leaf's own limits, is cancelled and
fails the round the same way; so do the other leaves' runs when one fails.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import arun_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run as current_run
from prefect.states import Cancelling
from prefect.types.entrypoint import EntrypointType

from aggregation.clipping import NormBoundState
from infra.errors import CanopyError
from infra.keys import leaf_outcome_key
from infra.settings import GatewaySettings, S3Settings
from infra.store import ObjectRef, get_json, put_json
from tasks.context import RunContext, store_for
from tasks.leaf import CLOSE_OVERDUE_S, UNREADABLE_AFTER_CLOSE_S, collect_leaf, run_log
from tasks.leaf_outcome import LeafOutcome
from tasks.params import TrainingParams

EDGE_POOL = "edge"
FLOW_NAME = "edge-leaf"
DEPLOYMENT_NAME = "edge-leaf"
DEPLOYMENT = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
REPO = Path(__file__).resolve().parent.parent
# A leaf run not started by a worker within this long fails the round: no worker is up.
PICKUP_TIMEOUT_S = 60.0
# How often the leaf level reads each leaf run's state (one small API read).
POLL_S = 0.2


class EdgeLeafError(CanopyError):
    """A leaf's run on the edge pool did not complete; the round cannot be committed."""


# ---------------------------------------------------------------- on the edge worker


@flow(name=FLOW_NAME, log_prints=True)
async def edge_leaf(
    params: TrainingParams,
    job: str,
    rnd: int,
    leaf: str,
    task_ref: ObjectRef,
    norm_state: NormBoundState,
) -> ObjectRef:
    """Collect one leaf's device updates until the round closes; store its outcome in S3.

    ``job`` is the job's declared name (the run's keys use it; the worker never
    resolves the job's code). S3's endpoint and credentials are the worker's own
    (``CANOPY_S3_*``); the bucket is the one the leaf's task is in.
    """
    s3 = S3Settings().model_copy(update={"bucket": task_ref.bucket})
    ctx = RunContext(params=params, s3=s3, gateway=GatewaySettings())
    outcome = await collect_leaf(ctx, leaf, task_ref, norm_state)
    body = {"flow_run_id": str(current_run.get_id()), "outcome": outcome.model_dump(mode="json")}
    key = leaf_outcome_key(job, params.run_id, rnd, leaf)
    return await asyncio.to_thread(put_json, store_for(s3), key, body, kind="leaf-outcome")


# ---------------------------------------------------------------- in the leaf level


async def collect_on_edge(
    ctx: RunContext, rnd: int, task_refs: dict[str, ObjectRef], norm_state: NormBoundState
) -> list[LeafOutcome]:
    """Every leaf's collection as an ``edge-leaf`` run at once; their outcomes, in order.

    If one fails, the others are cancelled (their runs too) and the error is raised.
    """
    runs = [
        asyncio.ensure_future(run_leaf(ctx, rnd, leaf, ref, norm_state))
        for leaf, ref in task_refs.items()
    ]
    try:
        return list(await asyncio.gather(*runs))
    except BaseException:
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        raise


def leaf_time_limit(params: TrainingParams) -> float:
    """Longest a leaf run may take: the round's deadline and the leaf's own limits after it."""
    return PICKUP_TIMEOUT_S + params.round_deadline_s + CLOSE_OVERDUE_S + UNREADABLE_AFTER_CLOSE_S


async def run_leaf(
    ctx: RunContext, rnd: int, leaf: str, task_ref: ObjectRef, norm_state: NormBoundState
) -> LeafOutcome:
    """One leaf's ``edge-leaf`` run, waited for; its outcome read back from S3."""
    parameters: dict[str, Any] = {
        "params": ctx.params.model_dump(mode="json"),
        "job": ctx.job,
        "rnd": rnd,
        "leaf": leaf,
        "task_ref": task_ref.model_dump(mode="json"),
        "norm_state": norm_state.model_dump(mode="json"),
    }
    run = await arun_deployment(
        DEPLOYMENT,
        parameters=parameters,
        timeout=0,  # waited for below, with a pickup limit and a cancel
        flow_run_name=f"r{rnd:04d}-{leaf}",
        as_subflow=True,
    )
    try:
        final = await _wait(run, leaf, leaf_time_limit(ctx.params))
    except BaseException:
        await _cancel(run.id)
        raise
    if final.state is None or final.state.type != StateType.COMPLETED:
        state = final.state
        raise EdgeLeafError(
            f"round {rnd}, leaf {leaf}: its edge-leaf run {final.name} ({final.id}) ended "
            f"{state.type.value if state else 'without a state'}"
            f"{': ' + state.message if state and state.message else ''}. The round is not "
            "committed; see the run's logs, then resume the run by its id to redo the round"
        )
    return await asyncio.to_thread(_read_outcome, ctx, rnd, leaf, final.id)


async def _wait(run: FlowRun, leaf: str, limit_s: float) -> FlowRun:
    """Poll the run until it is final; fail if no worker starts it or it overruns."""
    started = time.monotonic()
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(run.id)
            state = run.state
            if state is not None and state.is_final():
                return run
            waited = time.monotonic() - started
            if state is not None and state.is_scheduled() and waited > PICKUP_TIMEOUT_S:
                raise EdgeLeafError(
                    f"leaf {leaf}: no worker of the {EDGE_POOL!r} work pool started its run "
                    f"{run.name} within {PICKUP_TIMEOUT_S:.0f} s; start workers (`canopy up "
                    f"--edge-workers N`, or `prefect worker start --pool {EDGE_POOL}`) and "
                    "resume the run by its id"
                )
            if waited > limit_s:
                raise EdgeLeafError(
                    f"leaf {leaf}: its run {run.name} is still {state.type.value if state else '?'}"
                    f" after {limit_s:.0f} s (the round's deadline and the leaf's own limits); "
                    "cancelled. Resume the run by its id to redo the round"
                )
            await asyncio.sleep(POLL_S)


async def _cancel(run_id: UUID) -> None:
    """Ask the run's worker to stop it (best effort: the round fails either way)."""
    try:
        async with get_client() as client:
            await client.set_flow_run_state(run_id, Cancelling(), force=True)
    except Exception as exc:  # the API may be what failed; the round's error says more
        run_log().warning("could not cancel edge-leaf run %s: %r", run_id, exc)


def _read_outcome(ctx: RunContext, rnd: int, leaf: str, run_id: UUID) -> LeafOutcome:
    """The outcome the run stored; one another run left there (an older attempt) is refused."""
    body = get_json(store_for(ctx.s3), leaf_outcome_key(ctx.job, ctx.run_id, rnd, leaf))
    if body.get("flow_run_id") != str(run_id):
        raise EdgeLeafError(
            f"round {rnd}, leaf {leaf}: the stored outcome is from run {body.get('flow_run_id')}, "
            f"not from the run that just completed ({run_id}); resume the run by its id"
        )
    return LeafOutcome.model_validate(body["outcome"])


# ---------------------------------------------------------------- the deployment


async def register_edge_leaf(pool: str = EDGE_POOL, working_dir: Path = REPO) -> UUID:
    """Create the ``process`` work pool if absent and (re-)apply the ``edge-leaf`` deployment.

    ``working_dir`` is where the worker runs each leaf from: a checkout of this
    code (the worker's machine's own path in production).
    """
    async with get_client() as client:
        try:
            await client.read_work_pool(pool)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    deployment = await edge_leaf.ato_deployment(
        name=DEPLOYMENT_NAME,
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,  # flows.edge_leaf.edge_leaf: any cwd
        job_variables={"working_dir": str(working_dir)},
        tags=["canopy", "edge"],
        description="One leaf's collection of device updates, run beside the gateways.",
    )
    return await deployment.aapply()


def main(argv: list[str] | None = None) -> None:
    """``python -m flows.edge_leaf``: create the pool and (re-)apply the deployment."""
    parser = argparse.ArgumentParser(prog="python -m flows.edge_leaf", description=__doc__)
    parser.add_argument("--pool", default=EDGE_POOL, help="The process work pool's name.")
    parser.add_argument(
        "--working-dir", type=Path, default=REPO, help="Where workers run leaves from."
    )
    args = parser.parse_args(argv)
    deployment_id = asyncio.run(register_edge_leaf(args.pool, args.working_dir.resolve()))
    print(f"{DEPLOYMENT} on work pool {args.pool!r}: deployment {deployment_id}", flush=True)


if __name__ == "__main__":
    # Through the module's own name: registered from ``__main__``, the deployment's
    # entrypoint would be ``__main__.edge_leaf``, which no worker can load.
    from flows.edge_leaf import main as registered_by_name

    registered_by_name()
