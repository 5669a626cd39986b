"""Tasks above the leaves: add children's partials, apply the strategy, commit.

Inner nodes only add (``PartialAggregate`` is a commutative monoid), so any tree
shape gives the flat sum; the root divides by the total weight once and hands
the mean update to the server strategy. The new global model and strategy state
are written first and ``commit.json`` last, so a crash between them leaves the
previous round committed and the next attempt redoes this one.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict

from aggregation.accumulator import sum_partials
from aggregation.partial import PartialAggregate
from aggregation.tensors import decode_tensors, encode_tensors
from infra.keys import global_model_key, partial_key, server_state_key
from infra.lineage import make_record
from infra.store import ObjectRef, ObjectStore
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.ui import record_lineage


class RootResult(BaseModel):
    """The outcome of the root: new global model (or None when abandoned) and metrics."""

    model_config = ConfigDict(frozen=True)

    devices: int
    weight: float
    train_metrics: dict[str, float]
    global_model: ObjectRef | None = None
    server_state: ObjectRef | None = None
    root_partial: ObjectRef


def _load_partial(store: ObjectStore, ref: ObjectRef) -> PartialAggregate:
    obj = store.get(ref.key, expected_sha256=ref.sha256)
    return PartialAggregate.from_bytes(obj.data, source=ref.uri)


def _load_state(store: ObjectStore, ref: ObjectRef) -> dict:
    obj = store.get(ref.key, expected_sha256=ref.sha256)
    return decode_tensors(obj.data, source=ref.uri)[0]


def sum_children(
    ctx: RunContext, rnd: int, node: str, level: int, children: list[ObjectRef]
) -> tuple[PartialAggregate, ObjectRef]:
    """Read, add and store the children's partials of one node, with its lineage."""
    started = datetime.now(UTC)
    store = store_for(ctx.s3)
    total = sum_partials(_load_partial(store, ref) for ref in children)
    ref = store.put_bytes(
        partial_key(ctx.job, ctx.run_id, rnd, node), total.to_bytes(), kind="partial"
    )
    record_lineage(
        store,
        make_record(
            kind="partial-aggregation",
            inputs=children,
            outputs=[ref],
            parameters={
                "node": node,
                "level": level,
                "round": rnd,
                "devices": total.count,
                "weight": total.weight,
            },
            started_at=started,
            flow_run_id=current_flow_run_id(),
        ),
    )
    return total, ref


@task(name="sum-node", cache_policy=NONE, task_run_name="sum-{node}")
async def sum_node(
    ctx: RunContext, rnd: int, node: str, level: int, children: list[ObjectRef]
) -> ObjectRef:
    """An aggregator node: its partial is the sum of its children's."""
    _, ref = await asyncio.to_thread(sum_children, ctx, rnd, node, level, children)
    return ref


def _finalize(
    ctx: RunContext,
    rnd: int,
    level: int,
    children: list[ObjectRef],
    global_model: ObjectRef,
    server_state: ObjectRef | None,
) -> RootResult:
    total, root_ref = sum_children(ctx, rnd, "root", level, children)
    if total.count < ctx.params.min_reports:
        return RootResult(
            devices=total.count, weight=total.weight, train_metrics={}, root_partial=root_ref
        )
    started = datetime.now(UTC)
    store = store_for(ctx.s3)
    mean_update, metrics = total.finalize()
    strategy = ctx.params.strategy.build()
    current = _load_state(store, global_model)
    state = _load_state(store, server_state) if server_state else strategy.init_state(current)
    new_global, new_state = strategy.apply(current, mean_update, state)
    meta = {"job": ctx.job, "run-id": ctx.run_id, "round": str(rnd + 1)}
    g_ref = store.put_bytes(
        global_model_key(ctx.job, ctx.run_id, rnd + 1),
        encode_tensors(new_global, meta),
        kind="model",
        metadata=meta,
    )
    s_ref = store.put_bytes(
        server_state_key(ctx.job, ctx.run_id, rnd + 1),
        encode_tensors(new_state, meta),
        kind="server-state",
        metadata=meta,
    )
    record_lineage(
        store,
        make_record(
            kind="global-aggregation",
            inputs=[global_model, root_ref, *([server_state] if server_state else [])],
            outputs=[g_ref, s_ref],
            parameters={
                "round": rnd,
                "strategy": ctx.params.strategy.model_dump(mode="json"),
                "devices": total.count,
                "weight": total.weight,
                "train_metrics": metrics,
            },
            started_at=started,
            flow_run_id=current_flow_run_id(),
        ),
    )
    return RootResult(
        devices=total.count,
        weight=total.weight,
        train_metrics=metrics,
        global_model=g_ref,
        server_state=s_ref,
        root_partial=root_ref,
    )


@task(name="finalize-root", cache_policy=NONE)
async def finalize_root(
    ctx: RunContext,
    rnd: int,
    level: int,
    children: list[ObjectRef],
    global_model: ObjectRef,
    server_state: ObjectRef | None,
) -> RootResult:
    """The root: sum, divide once, apply the strategy; abandon below ``min_reports``."""
    return await asyncio.to_thread(_finalize, ctx, rnd, level, children, global_model, server_state)
