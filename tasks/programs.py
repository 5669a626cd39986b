"""The round's ExecuTorch training program: exported once per run, then patched per round.

A full export with its parity gate costs seconds (LeNet ~9 s here); patching a
round's weights into the run's parity-verified template and checking them in
the ExecuTorch runtime costs tenths. The first round of a run exports the
template (``edge.training.publish_program``) and stores its weight layout; later
rounds, and resumed runs, load it once into the run's cache. A job whose
weights cannot be located in its program falls back to a full, parity-gated
export every round. ExecuTorch is imported here lazily: PyTorch runs never load it.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger

from aggregation.tensors import TensorDict
from infra.errors import ConfigError
from infra.keys import program_key, program_layout_key, program_template_key
from infra.outputs import Output, Provenance, put_with_lineage
from infra.store import ObjectRef, ObjectStore, get_json, put_json
from tasks.aggregate import load_tensors
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.models import initial_model, planned_ref
from tasks.params import local_hyperparams
from tasks.results import ProgramExport
from tasks.run_cache import current_cache
from tasks.ui import emit_lineage_events

if TYPE_CHECKING:
    from edge.training.template import ProgramTemplate


def _full_export(
    ctx: RunContext,
    store: ObjectStore,
    state: TensorDict,
    model: ObjectRef,
    *,
    key: str,
    **extra: object,
) -> ObjectRef:
    """A full export behind the parity gate, stored at ``key`` with its lineage."""
    from edge.training.publish import publish_program

    job = ctx.job_spec()
    published = publish_program(
        store,
        job,
        state,
        key=key,
        inputs=[model],
        batch_size=local_hyperparams(ctx.params, job).batch_size,
        seed=ctx.params.seed,
        flow_run_id=current_flow_run_id(),
        parameters={"run_id": ctx.run_id, **ctx.job_source().lineage(), **extra},
        observers=[emit_lineage_events],
    )
    if published is None:
        raise ConfigError(f"job {ctx.job} has no network to export; use runtime=pytorch")
    return published.ref


def _template(
    ctx: RunContext, store: ObjectStore, state: TensorDict, model: ObjectRef
) -> tuple[ProgramTemplate, ObjectRef] | None:
    """The run's template and its reference; ``None`` when weights cannot be patched."""
    from edge.training.errors import ExportError
    from edge.training.template import ProgramTemplate, make_template

    batch_size = local_hyperparams(ctx.params, ctx.job_spec()).batch_size
    key = program_template_key(ctx.job, ctx.run_id, batch_size)
    layout_key = program_layout_key(ctx.job, ctx.run_id, batch_size)
    ref = store.head(key)
    if ref is not None and store.head(layout_key) is not None:
        found = ref

        def load() -> ProgramTemplate:
            pte = store.get(key, expected_sha256=found.sha256).data
            return ProgramTemplate.from_layout(pte, json.dumps(get_json(store, layout_key)))

        return current_cache().template(key, ref.sha256, load), ref
    ref = _full_export(ctx, store, state, model, key=key, role="template")
    try:
        template = make_template(store.get(key, expected_sha256=ref.sha256).data, state)
    except ExportError as exc:
        get_run_logger().warning("export-program: %s", exc)
        return None
    put_json(store, layout_key, json.loads(template.layout_json()), kind="program-layout")
    return current_cache().template(key, ref.sha256, lambda: template), ref


def _export(ctx: RunContext, rnd: int, model: ObjectRef) -> ProgramExport:
    from edge.training.template import patch_weights, verify_patched

    started, t0 = datetime.now(UTC), time.time()
    store = store_for(ctx.s3)
    state = load_tensors(store, model)
    key = program_key(ctx.job, ctx.run_id, rnd)
    found = _template(ctx, store, state, model)
    if found is None:  # weights not patchable: a full, parity-gated export every round
        ref = _full_export(ctx, store, state, model, key=key, round=rnd)
        return ProgramExport(ref=ref, method="full-export", started_at=t0, finished_at=time.time())
    template, template_ref = found
    pte = patch_weights(template, state)
    verify_patched(ctx.job_spec(), pte, state)  # the program holds exactly this round's weights
    meta = {"job": ctx.job, "run-id": ctx.run_id, "round": str(rnd), "model-version": model.sha256}
    ref = put_with_lineage(
        store,
        Output(key, pte, kind="executorch-program", metadata=meta),
        Provenance(
            kind="executorch-export",
            inputs=[model, template_ref],
            parameters={
                "round": rnd,
                "method": "template-weights-patched",
                "template_sha256": template_ref.sha256,
                "verified": "weights-equal",
                **ctx.job_source().lineage(),
            },
            started_at=started,
            flow_run_id=current_flow_run_id(),
        ),
        observers=[emit_lineage_events],
    )
    return ProgramExport(
        ref=ref, method="template-weights-patched", started_at=t0, finished_at=time.time()
    )


@task(name="export-program", cache_policy=NONE, retries=1)
async def export_program(ctx: RunContext, rnd: int, global_model: ObjectRef) -> ProgramExport:
    """Export the round's global model to an ExecuTorch training program (parity-gated)."""
    export = await asyncio.to_thread(_export, ctx, rnd, global_model)
    get_run_logger().info(
        "export-program: %s (%d bytes, %s)", export.ref.uri, export.ref.size, export.method
    )
    return export


def _export_template(ctx: RunContext) -> ObjectRef | None:
    from edge.training.errors import ExportError

    store = store_for(ctx.s3)
    state, output = initial_model(ctx)
    try:  # the initial model is stored only after its program exports and passes parity
        found = _template(ctx, store, state, planned_ref(store, output))
    except ExportError as exc:
        raise ConfigError(
            f"job {ctx.params.job!r} cannot train on ExecuTorch devices: {exc}; fix the model, "
            "or run it with runtime=pytorch"
        ) from exc
    return found[1] if found is not None else None


@task(name="export-template", cache_policy=NONE)
async def export_template(ctx: RunContext) -> ObjectRef | None:
    """A new ExecuTorch run's program template, from the initial model, before it is stored.

    Unsupported operators and parity failures stop the run here, before any
    model is written; round 0 then patches its weights into this template.
    """
    return await asyncio.to_thread(_export_template, ctx)
