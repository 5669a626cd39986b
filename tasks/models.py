"""Tasks around the global model: check the job, create the run's first model, evaluate.

Each writes its output to S3 with its lineage record beside it and returns only
references. The CPU-bound work (initialisation, evaluation) runs in a worker
thread so the flow's event loop keeps serving the other tasks of its level.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from aggregation.tensors import TensorDict, encode_tensors
from infra.keys import check_segment, evaluation_key, global_model_key
from infra.outputs import Output, Provenance, put_with_lineage
from infra.run_state import CommitRecord, read_commit, write_commit
from infra.store import ObjectRef, ObjectStore, sha256_hex
from tasks.aggregate import load_tensors
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.results import Evaluation
from tasks.run_cache import current_cache
from tasks.ui import emit_lineage_events

if TYPE_CHECKING:  # torch: imported where a model is built, not by the runner serving the flow
    from edge.data.dataset import Dataset
    from edge.jobs import JobSpec


def initial_model(ctx: RunContext) -> tuple[TensorDict, Output]:
    """The run's seeded initial weights and the object they are stored as (deterministic)."""
    from edge.training.state import initial_state

    state = initial_state(ctx.job_spec(), seed=ctx.params.seed)
    meta = {"job": ctx.job, "run-id": ctx.run_id, "round": "0"}
    key = global_model_key(ctx.job, ctx.run_id, 0)
    return state, Output(key, encode_tensors(state, meta), kind="model", metadata=meta)


def planned_ref(store: ObjectStore, output: Output) -> ObjectRef:
    """The reference ``output`` will have once stored (its bytes fix the sha256)."""
    return ObjectRef(
        bucket=store.bucket, key=output.key, sha256=sha256_hex(output.data), size=len(output.data)
    )


@task(name="read-commit", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def load_commit(ctx: RunContext) -> CommitRecord | None:
    """The run's commit pointer, or None for a new run."""
    return await asyncio.to_thread(read_commit, store_for(ctx.s3), ctx.job, ctx.run_id)


def _check(ctx: RunContext) -> dict[str, str | None]:
    from edge.training.validate import validate_job

    job = ctx.job_spec()
    check_segment(job.name, f"job {ctx.params.job!r} declares name")
    scheme = ctx.params.partition or job.partition
    validate_job(
        job,
        run_dataset(ctx, store_for(ctx.s3)),
        scheme=scheme,
        num_devices=ctx.params.num_devices,
        seed=ctx.params.seed,
    )
    return ctx.job_source().lineage()


@task(name="check-job", cache_policy=NONE)
async def check_job(ctx: RunContext) -> dict[str, str | None]:
    """Refuse a bad job before anything is written: model, data, shapes, partition.

    Returns where the job's code lives (reference, file, sha256) for lineage.
    """
    return await asyncio.to_thread(_check, ctx)


def _create_initial(ctx: RunContext, source: dict[str, str | None]) -> CommitRecord:
    started = datetime.now(UTC)
    store = store_for(ctx.s3)
    _, output = initial_model(ctx)
    ref = put_with_lineage(
        store,
        output,
        Provenance(
            kind="initial-model",
            inputs=[],
            parameters={
                "job": ctx.job,
                **source,
                "seed": ctx.params.seed,
                "params": ctx.params.model_dump(mode="json"),
            },
            started_at=started,
            flow_run_id=current_flow_run_id(),
        ),
        observers=[emit_lineage_events],
    )
    commit = CommitRecord(
        job=ctx.job, run_id=ctx.run_id, next_round=0, global_model=ref, updated_at=datetime.now(UTC)
    )
    write_commit(store, commit)
    return commit


@task(name="create-initial-model", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def create_initial_model(ctx: RunContext, source: dict[str, str | None]) -> CommitRecord:
    """A new run's seeded initial model, then its commit pointer (round 0 next)."""
    return await asyncio.to_thread(_create_initial, ctx, source)


def run_dataset(ctx: RunContext, store: ObjectStore) -> Dataset:
    """The run's dataset (held-out split for evaluation), loaded or generated once per run."""
    job = ctx.job_spec()
    config = ctx.params.dataset or job.default_dataset
    return current_cache().dataset(
        job.name, config.model_dump_json(), lambda: job.dataset(config, store=store)
    )


def held_out_metrics(
    job: JobSpec, state: TensorDict, x: np.ndarray, y: np.ndarray, limit: int
) -> tuple[dict[str, float], int]:
    """The job's metrics of ``state`` on the first ``limit`` test examples, and how many.

    A dataset with an empty test split gets no server metric (``{}``, 0): only a
    federated evaluation (``eval_every``) measures such a job.
    """
    n = min(limit, x.shape[0])
    if n == 0:
        return {}, 0
    from edge.training.evaluate import evaluate

    return evaluate(job, state, x[:n], y[:n]), n


def _evaluate(ctx: RunContext, rnd: int, model: ObjectRef) -> Evaluation:
    started, t0 = datetime.now(UTC), time.time()
    store = store_for(ctx.s3)
    state = load_tensors(store, model)
    data = run_dataset(ctx, store)
    x, y = data.split_arrays("test")
    metrics, n = held_out_metrics(ctx.job_spec(), state, x, y, ctx.params.eval_samples)
    about = {"round": rnd, "dataset": data.name, "generated": data.generated, "samples": n}
    ref = put_with_lineage(
        store,
        Output.json(
            evaluation_key(ctx.job, ctx.run_id, rnd + 1),
            {**about, "model": model.uri, "metrics": metrics},
            kind="evaluation",
        ),
        Provenance(
            kind="evaluation",
            inputs=[model],
            parameters=about,
            started_at=started,
            flow_run_id=current_flow_run_id(),
        ),
        observers=[emit_lineage_events],
    )
    return Evaluation(
        metrics=metrics,
        dataset=data.name,
        samples=n,
        ref=ref,
        started_at=t0,
        finished_at=time.time(),
    )


@task(name="evaluate-model", cache_policy=NONE)
async def evaluate_model(ctx: RunContext, rnd: int, model: ObjectRef) -> Evaluation:
    """Held-out loss and accuracy of the new global model."""
    return await asyncio.to_thread(_evaluate, ctx, rnd, model)
