"""Federated evaluation: devices evaluate the round's new global model on their own data.

A round that evaluates on devices (``eval_every``) reopens its round number
with evaluation tasks once the new global model exists: ``open_evaluation``
writes every leaf's evaluate task and then the pointer (``kind="evaluate"``),
exactly as a round opens. The close task (``tasks.collect.close_when_due``)
watches the results come in and closes it; ``collect_evaluation`` reads each
leaf's group-committed results into the pure
``aggregation.evaluation.EvaluationCollector`` until the pointer says closed
(the gateways' close fence makes that last read complete, as for updates);
``sum_evaluation`` adds the leaves' metric sums, divides once and stores the
result with its lineage. The metric sums are a few numbers per leaf, so they
skip the tree's middle levels and are added at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from prefect import task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger

from aggregation.evaluation import EvaluationCollector, EvaluationSums
from edge import round_control
from edge.manifests import LeafTask
from edge.update_batch import decode_update_batch
from infra.errors import CanopyError
from infra.keys import (
    batch_update_count,
    device_evaluation_key,
    device_evaluation_prefix,
    evaluation_results_prefix,
)
from infra.outputs import Output, Provenance, put_with_lineage
from infra.store import ObjectRef, ObjectStore, get_json
from tasks.close_signal import pause_unless_closed
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.dispatch import PlanBasis, open_planned, registered_devices
from tasks.gateways import wake_soon
from tasks.planning import OpenedRound, RoundPlan, plan_evaluation
from tasks.results import Closing, DeviceEvaluation, EvaluationLeaf
from tasks.ui import emit_lineage_events, warn_refused

POLL_SECONDS = 0.25
CLOSE_OVERDUE_S = 120.0
CORRUPT_BATCH = "corrupt-batch"


def count_evaluations(store: ObjectStore, job: str, run_id: str, rnd: int) -> int:
    """Results landed for a round's evaluation across every leaf, from key names (one LIST)."""
    prefix = f"{device_evaluation_prefix(job, run_id, rnd)}results/"
    return sum(batch_update_count(key) for key in store.list_keys(prefix))


@task(name="open-evaluation", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def open_evaluation(
    ctx: RunContext, rnd: int, leaves: Sequence[str], model: ObjectRef
) -> OpenedRound:
    """Sample the registry, write every leaf's evaluate task, then point the gateways at it."""

    def plan(basis: PlanBasis) -> RoundPlan:
        return plan_evaluation(
            ctx.params,
            ctx.job_spec(),
            rnd=rnd,
            devices=registered_devices(basis.store, ctx.job),  # keys only: one LIST
            leaves=leaves,
            global_model=model,
            tensor_spec=basis.tensor_spec,
            now=basis.now,
            max_num_samples=basis.max_num_samples,
        )

    opened = await asyncio.to_thread(open_planned, ctx, model, plan)
    wake_soon(ctx.gateway, ctx.job)
    get_run_logger().info(
        "open-evaluation: round %d asks %d device(s) to evaluate model %s, closes at %d "
        "results or %s",
        rnd,
        opened.selected,
        model.sha256[:12],
        opened.target,
        opened.deadline.isoformat(timespec="seconds"),
    )
    return opened


@dataclass
class EvaluationIntake:
    """Result batches read so far for one leaf, and the collector they were offered to."""

    store: ObjectStore
    task: LeafTask
    collector: EvaluationCollector
    seen: set[str] = field(default_factory=set)
    batches: list[ObjectRef] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.collector.reported) >= len(self.task.selected_device_ids)

    def read_new(self) -> None:
        t = self.task
        prefix = evaluation_results_prefix(t.job, t.run_id, t.round, t.leaf)
        for key in self.store.list_keys(prefix):
            if key in self.seen:
                continue
            self.seen.add(key)
            try:
                obj = self.store.get(key)
                results = decode_update_batch(obj.data, source=obj.ref.uri)
            except CanopyError as exc:  # one corrupted batch must not sink the evaluation
                self.collector.rejected[CORRUPT_BATCH] += 1
                self.collector.rejection_examples.setdefault(CORRUPT_BATCH, str(exc))
                continue
            self.batches.append(obj.ref)
            for r in results:
                self.collector.offer(
                    device_id=r.device_id,
                    task_id=r.task_id,
                    model_version=r.model_version,
                    num_samples=r.num_samples,
                    metrics=r.metrics,
                )


async def _read_until_closed(intake: EvaluationIntake) -> None:
    """Read result batches while the evaluation is open; after reading it closed, once more."""
    t = intake.task
    give_up = t.deadline + timedelta(seconds=CLOSE_OVERDUE_S)
    while True:
        still_open = await asyncio.to_thread(
            round_control.round_is_open, intake.store, t.job, t.run_id, t.round, "evaluate"
        )
        if not intake.complete:
            await asyncio.to_thread(intake.read_new)
        if not still_open or intake.complete:
            return
        if datetime.now(UTC) > give_up:
            raise CanopyError(
                f"the evaluation of round {t.round} of {t.job}/{t.run_id} is still open "
                f"{CLOSE_OVERDUE_S:.0f} s after its deadline; leaf {t.leaf} stops"
            )
        await pause_unless_closed(t.job, t.run_id, t.round, "evaluate", POLL_SECONDS)


@task(name="collect-evaluation", cache_policy=NONE, task_run_name="evaluate-{leaf}")
async def collect_evaluation(ctx: RunContext, leaf: str, task_ref: ObjectRef) -> EvaluationLeaf:
    """Sum this leaf's device evaluations until the evaluation closes."""
    store = store_for(ctx.s3)
    leaf_task = LeafTask.model_validate(
        await asyncio.to_thread(get_json, store, task_ref.key, expected_sha256=task_ref.sha256)
    )
    collector = EvaluationCollector(
        task_id=leaf_task.task_id,
        model_version=leaf_task.model_version,
        selected=frozenset(leaf_task.selected_device_ids),
        metrics=tuple(leaf_task.metrics),
        max_samples=leaf_task.max_num_samples,
    )
    intake = EvaluationIntake(store=store, task=leaf_task, collector=collector)
    await _read_until_closed(intake)
    warn_refused("collect-evaluation", leaf, collector.rejected, collector.rejection_examples)
    return EvaluationLeaf(
        leaf=leaf,
        sums=collector.result().to_json(),
        rejected=dict(collector.rejected),
        rejection_examples=dict(collector.rejection_examples),
        duplicates=collector.duplicates,
        batches=intake.batches,
        finished_at=time.time(),
    )


def _store_sums(
    ctx: RunContext,
    opened: OpenedRound,
    model: ObjectRef,
    leaves: Sequence[EvaluationLeaf],
) -> DeviceEvaluation:
    total = EvaluationSums.total(EvaluationSums.from_json(o.sums) for o in leaves)
    rejected: dict[str, int] = {}
    for o in leaves:
        for reason, n in o.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + n
    metrics = total.means()
    about = {
        "round": opened.round,
        "model": model.uri,
        "devices": total.devices,
        "samples": total.samples,
        "selected": opened.selected,
        "rejected": rejected,
    }
    ref = put_with_lineage(
        store_for(ctx.s3),
        Output.json(
            device_evaluation_key(ctx.job, ctx.run_id, opened.round),
            {**about, "metrics": metrics, "sums": total.to_json()},
            kind="device-evaluation",
        ),
        Provenance(
            kind="device-evaluation",
            inputs=[model, *(b for o in leaves for b in o.batches)],
            parameters=about,
            started_at=datetime.fromtimestamp(opened.started_at, UTC),
            flow_run_id=current_flow_run_id(),
        ),
        observers=[emit_lineage_events],
    )
    return DeviceEvaluation(
        metrics=metrics,
        devices=total.devices,
        samples=total.samples,
        selected=opened.selected,
        rejected=rejected,
        ref=ref,
        started_at=opened.started_at,
        finished_at=time.time(),
    )


@task(name="sum-evaluation", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 3])
async def sum_evaluation(
    ctx: RunContext,
    opened: OpenedRound,
    model: ObjectRef,
    closing: Closing,
    leaves: Sequence[EvaluationLeaf],
) -> DeviceEvaluation:
    """Add the leaves' metric sums, divide once, store the result (with lineage)."""
    result = await asyncio.to_thread(_store_sums, ctx, opened, model, leaves)
    get_run_logger().info(
        "sum-evaluation: round %d, %d device(s) over %d held-out example(s) (%s): %s",
        opened.round,
        result.devices,
        result.samples,
        closing.reason,
        ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()) or "no results",
    )
    return result
