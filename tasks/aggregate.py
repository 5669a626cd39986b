"""Tasks above the leaves: add children's partials, then apply the server strategy.

Inner nodes only add (``PartialAggregate`` is a commutative monoid), so any tree
shape gives the flat sum; the root divides by the total weight once and hands
the mean update to the server strategy. The new global model and strategy state
are written here, ``commit.json`` only later by the commit task, so a crash in
between leaves the previous round committed and the next attempt redoes this one.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NONE

from aggregation.accumulator import sum_partials
from aggregation.clipping import AdaptiveNormBound, NormBoundState
from aggregation.partial import PartialAggregate
from aggregation.tensors import TensorDict, decode_tensors, encode_tensors
from infra.keys import global_model_key, partial_key, server_state_key
from infra.outputs import Output, Provenance, put_all_with_lineage, put_with_lineage
from infra.store import ObjectRef, ObjectStore, sha256_hex
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.deferred import deferred
from tasks.results import RootResult
from tasks.threads import in_thread
from tasks.ui import emit_lineage_events


def load_partial(store: ObjectStore, ref: ObjectRef) -> PartialAggregate:
    obj = store.get(ref.key, expected_sha256=ref.sha256)
    return PartialAggregate.from_bytes(obj.data, source=ref.uri)


def load_tensors(store: ObjectStore, ref: ObjectRef) -> TensorDict:
    obj = store.get(ref.key, expected_sha256=ref.sha256)
    return decode_tensors(obj.data, source=ref.uri)[0]


def _sum_output(
    ctx: RunContext, rnd: int, node: str, level: int, children: list[ObjectRef]
) -> tuple[PartialAggregate, Output, Provenance]:
    """A node's partial (the sum of its children's), and how to store and record it."""
    started = datetime.now(UTC)
    total = sum_partials(load_partial(store_for(ctx.s3), ref) for ref in children)
    output = Output(partial_key(ctx.job, ctx.run_id, rnd, node), total.to_bytes(), kind="partial")
    provenance = Provenance(
        kind="partial-aggregation",
        inputs=children,
        parameters={
            "node": node,
            "level": level,
            "round": rnd,
            "devices": total.count,
            "weight": total.weight,
        },
        started_at=started,
        flow_run_id=current_flow_run_id(),
    )
    return total, output, provenance


@task(name="sum-node", cache_policy=NONE, task_run_name="sum-{node}")
@in_thread
def sum_node(
    ctx: RunContext, rnd: int, node: str, level: int, children: list[ObjectRef]
) -> ObjectRef:
    """An aggregator node: its partial is the sum of its children's."""
    _, output, provenance = _sum_output(ctx, rnd, node, level, children)
    return put_with_lineage(
        store_for(ctx.s3),
        output,
        provenance,
        observers=[emit_lineage_events],
        later=deferred(rnd),
    )


@task(name="finalize-root", cache_policy=NONE)
@in_thread
def finalize_root(
    ctx: RunContext,
    rnd: int,
    node: str,
    level: int,
    children: list[ObjectRef],
    global_model: ObjectRef,
    server_state: ObjectRef | None,
    prior_norms: NormBoundState,
) -> RootResult:
    """The root: sum the top level, divide once, apply the strategy; abandon below
    ``min_reports``.

    The root's partial, the new global model and the strategy state are stored
    side by side (their lineage records after them, ``tasks.deferred``): this is
    the last step before the next round can open. A committed round also moves
    the adaptive norm bound toward the median norm of its updates
    (``aggregation.clipping``), for the next round.
    """
    started = datetime.now(UTC)
    store = store_for(ctx.s3)
    total, root_output, root_provenance = _sum_output(ctx, rnd, node, level, children)
    root_ref = planned_ref(store.bucket, root_output)
    metrics: dict[str, float] = {}
    g_ref = s_ref = norm_state = None
    outputs: list[tuple[list[Output], Provenance]] = [([root_output], root_provenance)]
    if total.count >= ctx.params.min_reports:  # below it the round is abandoned
        mean_update, metrics = total.finalize()
        norm_state = AdaptiveNormBound().next_state(prior_norms, total.norms)
        about = {"devices": total.count, "weight": total.weight, "train_metrics": metrics}
        outputs.append(
            _next_model(
                ctx, store, rnd, mean_update, global_model, server_state, root_ref, started, about
            )
        )
    with ThreadPoolExecutor(max_workers=len(outputs)) as pool:
        refs = list(
            pool.map(
                lambda step: put_all_with_lineage(
                    store, step[0], step[1], observers=[emit_lineage_events], later=deferred(rnd)
                ),
                outputs,
            )
        )
    if refs[0][0] != root_ref:
        raise RuntimeError(f"root partial stored as {refs[0][0]}, expected {root_ref}")
    if len(refs) > 1:
        g_ref, s_ref = refs[1]
    return RootResult(
        devices=total.count,
        weight=total.weight,
        train_metrics=metrics,
        global_model=g_ref,
        server_state=s_ref,
        root_partial=root_ref,
        median_norm=total.norms.quantile(0.5),
        norm_state=norm_state,
        finished_at=time.time(),
    )


def planned_ref(bucket: str, output: Output) -> ObjectRef:
    """The reference an output will have once stored (its bytes decide its sha256)."""
    return ObjectRef(
        bucket=bucket, key=output.key, sha256=sha256_hex(output.data), size=len(output.data)
    )


def _next_model(
    ctx: RunContext,
    store: ObjectStore,
    rnd: int,
    mean_update: TensorDict,
    global_model: ObjectRef,
    server_state: ObjectRef | None,
    root_partial: ObjectRef,
    started: datetime,
    about: dict[str, object],
) -> tuple[list[Output], Provenance]:
    """Apply the strategy to the mean update: the next global model and strategy state to
    store, and their lineage."""
    strategy = ctx.params.strategy.build()
    current = load_tensors(store, global_model)
    state = load_tensors(store, server_state) if server_state else strategy.init_state(current)
    new_global, new_state = strategy.apply(current, mean_update, state)
    meta = {"job": ctx.job, "run-id": ctx.run_id, "round": str(rnd + 1)}
    outputs = [
        Output(
            global_model_key(ctx.job, ctx.run_id, rnd + 1),
            encode_tensors(new_global, meta),
            kind="model",
            metadata=meta,
        ),
        Output(
            server_state_key(ctx.job, ctx.run_id, rnd + 1),
            encode_tensors(new_state, meta),
            kind="server-state",
            metadata=meta,
        ),
    ]
    provenance = Provenance(
        kind="global-aggregation",
        inputs=[global_model, root_partial, *([server_state] if server_state else [])],
        parameters={
            "round": rnd,
            "strategy": ctx.params.strategy.model_dump(mode="json"),
            **about,
        },
        started_at=started,
        flow_run_id=current_flow_run_id(),
    )
    return outputs, provenance
