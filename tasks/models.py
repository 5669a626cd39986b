"""Tasks around the global model: create the run's first one, evaluate each new one.

Each writes its output to S3 with its lineage record beside it and returns only
references. The CPU-bound work (initialisation, evaluation) runs in a worker
thread so the flow's event loop keeps serving the other tasks of its level.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NONE

from aggregation.tensors import encode_tensors
from edge.data.dataset import Dataset
from edge.training.evaluate import evaluate
from edge.training.state import initial_state
from infra.keys import evaluation_key, global_model_key
from infra.outputs import Output, Provenance, put_with_lineage
from infra.run_state import CommitRecord, read_commit, write_commit
from infra.store import ObjectRef, ObjectStore
from tasks.aggregate import load_tensors
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.results import Evaluation
from tasks.run_cache import current_cache
from tasks.ui import emit_lineage_events


def _ensure_initial(ctx: RunContext) -> CommitRecord:
    store = store_for(ctx.s3)
    commit = read_commit(store, ctx.job, ctx.run_id)
    if commit is not None:
        return commit
    started = datetime.now(UTC)
    state = initial_state(ctx.job_spec(), seed=ctx.params.seed)
    meta = {"job": ctx.job, "run-id": ctx.run_id, "round": "0"}
    ref = put_with_lineage(
        store,
        Output(
            global_model_key(ctx.job, ctx.run_id, 0),
            encode_tensors(state, meta),
            kind="model",
            metadata=meta,
        ),
        Provenance(
            kind="initial-model",
            inputs=[],
            parameters={
                "job": ctx.job,
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


@task(name="ensure-initial-model", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def ensure_initial_model(ctx: RunContext) -> CommitRecord:
    """The run's commit pointer; on a new run, create the seeded initial model first."""
    return await asyncio.to_thread(_ensure_initial, ctx)


def run_dataset(ctx: RunContext, store: ObjectStore) -> Dataset:
    """The run's dataset (held-out split for evaluation), loaded or generated once per run."""
    job = ctx.job_spec()
    config = ctx.params.dataset or job.default_dataset
    return current_cache().dataset(
        job.name, config.model_dump_json(), lambda: job.dataset(config, store=store)
    )


def _evaluate(ctx: RunContext, rnd: int, model: ObjectRef) -> Evaluation:
    started, t0 = datetime.now(UTC), time.time()
    store = store_for(ctx.s3)
    state = load_tensors(store, model)
    data = run_dataset(ctx, store)
    x, y = data.split_arrays("test")
    n = min(ctx.params.eval_samples, x.shape[0])
    metrics = evaluate(ctx.job_spec(), state, x[:n], y[:n])
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
