"""Tasks around the global model: create it, export it to ExecuTorch, evaluate it.

Each writes its output to S3 and a lineage record beside it, and returns only
references. The CPU-bound work (export, evaluation) runs in a worker thread so
the flow's event loop keeps serving the other tasks of its level.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict

from aggregation.tensors import TensorDict, decode_tensors, encode_tensors
from edge.data.config import DatasetConfig
from edge.data.dataset import Dataset
from edge.jobs import JobSpec, get_job
from edge.training import (
    ExportError,
    PublishedProgram,
    evaluate,
    initial_state,
    publish_program,
)
from edge.training.template import ProgramTemplate, make_template, patch_weights, verify_patched
from tasks.params import local_hyperparams
from infra.errors import ConfigError
from infra.keys import global_model_key, program_key, program_template_key, run_prefix
from infra.lineage import make_record, read_lineage
from infra.run_state import CommitRecord, read_commit, write_commit
from infra.store import ObjectRef, ObjectStore, get_json, put_json
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.ui import emit_lineage_events, record_lineage


class Evaluation(BaseModel):
    """Held-out metrics of a global model, and which data they were measured on."""

    model_config = ConfigDict(frozen=True)

    metrics: dict[str, float]
    dataset: str
    samples: int
    ref: ObjectRef


def _model_meta(ctx: RunContext, rnd: int) -> dict[str, str]:
    return {"job": ctx.job, "run-id": ctx.run_id, "round": str(rnd)}


def _ensure_initial(ctx: RunContext) -> CommitRecord:
    store = store_for(ctx.s3)
    commit = read_commit(store, ctx.job, ctx.run_id)
    if commit is not None:
        return commit
    started = datetime.now(UTC)
    state = initial_state(get_job(ctx.job), seed=ctx.params.seed)
    meta = _model_meta(ctx, 0)
    ref = store.put_bytes(
        global_model_key(ctx.job, ctx.run_id, 0),
        encode_tensors(state, meta),
        kind="model",
        metadata=meta,
    )
    record_lineage(
        store,
        make_record(
            kind="initial-model",
            inputs=[],
            outputs=[ref],
            parameters={
                "job": ctx.job,
                "seed": ctx.params.seed,
                "params": ctx.params.model_dump(mode="json"),
            },
            started_at=started,
            flow_run_id=current_flow_run_id(),
        ),
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


# Program templates loaded in this process, by S3 key and sha256.
_TEMPLATES: dict[tuple[str, str], ProgramTemplate] = {}


def _publish_full(
    ctx: RunContext,
    store: ObjectStore,
    job: JobSpec,
    state: TensorDict,
    global_model: ObjectRef,
    *,
    key: str,
    parameters: dict[str, object],
) -> PublishedProgram:
    """A full export behind the parity gate, stored at ``key``, lineage mirrored to Prefect."""
    published = publish_program(
        store,
        job,
        state,
        key=key,
        inputs=[global_model],
        batch_size=local_hyperparams(ctx.params, job).batch_size,
        seed=ctx.params.seed,
        flow_run_id=current_flow_run_id(),
        parameters={"run_id": ctx.run_id, **parameters},
    )
    if published is None:
        raise ConfigError(f"job {ctx.job} has no network to export; use runtime=pytorch")
    if (record := read_lineage(store, key)) is not None:
        emit_lineage_events(record)
    return published


def _template(
    ctx: RunContext, store: ObjectStore, job: JobSpec, state: TensorDict, global_model: ObjectRef
) -> tuple[ProgramTemplate, ObjectRef] | None:
    """The run's parity-verified program template: exported once, then reused.

    ``None`` when the job's weights cannot be located in its program (for
    example several all-zero tensors); the caller then exports every round.
    """
    batch = local_hyperparams(ctx.params, job).batch_size
    key = program_template_key(ctx.job, ctx.run_id, batch)
    layout_key = f"{key}.layout.json"
    ref = store.head(key)
    if ref is None or store.head(layout_key) is None:
        published = _publish_full(
            ctx, store, job, state, global_model, key=key, parameters={"role": "template"}
        )
        try:
            pte = store.get(key, expected_sha256=published.ref.sha256).data
            template = make_template(pte, state)
        except ExportError as exc:
            get_run_logger().warning("export-program: %s", exc)
            return None
        put_json(store, layout_key, json.loads(template.layout_json()), kind="program-layout")
        _TEMPLATES[(key, published.ref.sha256)] = template
        return template, published.ref
    if (key, ref.sha256) not in _TEMPLATES:
        pte = store.get(key, expected_sha256=ref.sha256).data
        layout = json.dumps(get_json(store, layout_key))
        _TEMPLATES[(key, ref.sha256)] = ProgramTemplate.from_layout(pte, layout)
    return _TEMPLATES[(key, ref.sha256)], ref


def _export(ctx: RunContext, rnd: int, global_model: ObjectRef) -> ObjectRef:
    started = datetime.now(UTC)
    store = store_for(ctx.s3)
    obj = store.get(global_model.key, expected_sha256=global_model.sha256)
    state, _ = decode_tensors(obj.data, source=global_model.uri)
    job = get_job(ctx.job)
    key = program_key(ctx.job, ctx.run_id, rnd)
    found = _template(ctx, store, job, state, global_model)
    if found is None:  # weights not patchable: a full, parity-gated export every round
        return _publish_full(
            ctx, store, job, state, global_model, key=key, parameters={"round": rnd}
        ).ref
    template, template_ref = found
    pte = patch_weights(template, state)
    verify_patched(job, pte, state)  # the program holds exactly this round's weights
    meta = {**_model_meta(ctx, rnd), "model-version": global_model.sha256}
    ref = store.put_bytes(key, pte, kind="executorch-program", metadata=meta)
    record_lineage(
        store,
        make_record(
            kind="executorch-export",
            inputs=[global_model, template_ref],
            outputs=[ref],
            parameters={
                "round": rnd,
                "method": "template-weights-patched",
                "template_sha256": template_ref.sha256,
                "verified": "weights-equal",
            },
            started_at=started,
            flow_run_id=current_flow_run_id(),
        ),
    )
    return ref


@task(name="export-program", cache_policy=NONE, retries=1)
async def export_program(ctx: RunContext, rnd: int, global_model: ObjectRef) -> ObjectRef:
    """Export the round's global model to an ExecuTorch training program (parity-gated)."""
    ref = await asyncio.to_thread(_export, ctx, rnd, global_model)
    get_run_logger().info("export-program: %s (%d bytes)", ref.uri, ref.size)
    return ref


# Loaded (or generated) once per process and job/config, not once per round.
_DATASETS: dict[tuple[str, str], Dataset] = {}


def _dataset_for(job: JobSpec, config: DatasetConfig, store: ObjectStore) -> Dataset:
    key = (job.name, config.model_dump_json())
    if key not in _DATASETS:
        _DATASETS[key] = job.dataset(config, store=store)
    return _DATASETS[key]


def _evaluate(ctx: RunContext, rnd: int, model: ObjectRef) -> Evaluation:
    started = datetime.now(UTC)
    store = store_for(ctx.s3)
    state, _ = decode_tensors(
        store.get(model.key, expected_sha256=model.sha256).data, source=model.uri
    )
    job = get_job(ctx.job)
    config = ctx.params.dataset or job.default_dataset
    data = _dataset_for(job, config, store)
    x, y = data.split_arrays("test")
    n = min(ctx.params.eval_samples, x.shape[0])
    metrics = evaluate(job, state, x[:n], y[:n])
    key = f"{run_prefix(ctx.job, ctx.run_id)}round-{rnd + 1:05d}/evaluation.json"
    payload = {
        "round": rnd,
        "model": model.uri,
        "metrics": metrics,
        "dataset": data.name,
        "generated": data.generated,
        "samples": n,
    }
    ref = put_json(store, key, payload, kind="evaluation")
    record_lineage(
        store,
        make_record(
            kind="evaluation",
            inputs=[model],
            outputs=[ref],
            parameters={
                "round": rnd,
                "dataset": data.name,
                "generated": data.generated,
                "samples": n,
            },
            started_at=started,
            flow_run_id=current_flow_run_id(),
        ),
    )
    return Evaluation(metrics=metrics, dataset=data.name, samples=n, ref=ref)


@task(name="evaluate-model", cache_policy=NONE)
async def evaluate_model(ctx: RunContext, rnd: int, model: ObjectRef) -> Evaluation:
    """Held-out loss and accuracy of the new global model."""
    return await asyncio.to_thread(_evaluate, ctx, rnd, model)
