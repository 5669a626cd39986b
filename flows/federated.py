"""The ``federated-training`` flow: each round a subflow, each tree level a subflow.

    federated-training                      (one run of a job, resumable by run id)
      round-0000 ... round-NNNN             (one subflow per round)
        export-program, wait-for-devices, open-round
        r0000-level-0  collect-leaf x L     (leaf level: device updates -> leaf partials)
        r0000-level-1  sum-node x ...       (aggregator levels: partial sums)
        r0000-server   finalize-root, evaluate-model
        commit

Subflows are per *level*, not per node, and async with their tasks under
``asyncio.gather``: a sync subflow costs about a second (its heartbeat thread),
so this keeps Prefect's fixed cost per round small (benchmarks/round_overhead.py).
Tasks exchange S3 references, never tensors. The logic lives in ``aggregation``,
``edge``, ``infra`` and ``tasks``; this module only orchestrates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.states import Completed, State

from aggregation.strategies.config import StrategyConfig
from aggregation.topology import Node, Tree, TreeShape, build_tree
from edge.data.config import DatasetConfig
from edge.data.partition import PartitionScheme
from edge.manifests import close_grace_seconds
from tasks.params import TrainingParams
from infra.keys import lineage_key
from infra.run_state import CommitRecord, RoundReport, read_reports
from infra.settings import GatewaySettings, S3Settings
from infra.store import ObjectRef
from tasks.aggregate import RootResult, finalize_root, sum_node
from tasks.collect import LeafOutcome, ReportTracker, collect_leaf, wait_until_enough
from tasks.context import RunContext, current_flow_run_id, store_for
from tasks.dispatch import RoundPlan, close_round, mark_done, open_round, wait_for_devices
from tasks.gateways import late_between, read_late_counts
from tasks.models import ensure_initial_model, evaluate_model, export_program
from tasks.rounds import commit_round
from tasks.ui import publish_job_summary, publish_round_artifacts, set_progress, start_progress

# The flow's signature repeats TrainingParams' fields (Prefect builds its UI form and
# `-p` parsing from the signature); defaults come from this one unvalidated instance.
_D = TrainingParams.model_construct(job="")


# ---------------------------------------------------------------- level subflows

# After closing a round, time allowed for an accepted upload's S3 PUT to land
# (on top of the gateways' manifest cache and group-commit wait).
CLOSE_PUT_MARGIN_S = 0.5


@flow(name="leaf-level", validate_parameters=False, log_prints=True)
async def leaf_level(ctx: RunContext, plan: RoundPlan, tracker: ReportTracker) -> list[LeafOutcome]:
    """Collect device updates on every leaf until the round has enough reports."""
    progress = await start_progress(f"round {plan.round}: device reports ({plan.target} needed)")

    async def on_progress(reported: int) -> None:
        await set_progress(progress, 100.0 * reported / max(1, plan.target))

    async def close_when_enough() -> None:
        await wait_until_enough(tracker, on_progress)
        tracker.enough_at = time.perf_counter()
        await close_round(ctx, plan)
        if tracker.reported < plan.selected:
            # Uploads a gateway accepted just before it saw the close may still be landing.
            await asyncio.sleep(
                close_grace_seconds(
                    ctx.gateway.manifest_cache_seconds,
                    ctx.gateway.group_commit_max_wait_ms,
                    put_margin=CLOSE_PUT_MARGIN_S,
                )
            )
        tracker.closed.set()

    results = await asyncio.gather(
        close_when_enough(),
        *(collect_leaf(ctx, plan.tasks[leaf], tracker) for leaf in plan.leaves),
    )
    return list(results[1:])


@flow(name="aggregator-level", validate_parameters=False)
async def aggregator_level(
    ctx: RunContext, rnd: int, nodes: list[Node], children: dict[str, ObjectRef]
) -> dict[str, ObjectRef]:
    """Every node of one level adds its children's partials."""
    refs = await asyncio.gather(
        *(sum_node(ctx, rnd, n.name, n.level, [children[c] for c in n.children]) for n in nodes)
    )
    return {n.name: ref for n, ref in zip(nodes, refs, strict=True)}


@flow(name="server-level", validate_parameters=False)
async def server_level(
    ctx: RunContext, rnd: int, root: Node, children: dict[str, ObjectRef], commit: CommitRecord
) -> RootResult:
    """The root sums the top level, divides once and applies the server strategy."""
    return await finalize_root(
        ctx,
        rnd,
        root.level,
        [children[c] for c in root.children],
        commit.global_model,
        commit.server_state,
    )


# ---------------------------------------------------------------- one round


@flow(name="fl-round", validate_parameters=False, log_prints=True)
async def training_round(ctx: RunContext, tree: Tree, commit: CommitRecord) -> State:
    """Export, dispatch, collect, aggregate level by level, evaluate, commit."""
    logger = get_run_logger()
    started = time.perf_counter()
    rnd = commit.next_round
    tag = f"r{rnd:04d}"

    marks = {"start": started}
    late_before = await read_late_counts(ctx.gateway, ctx.job)
    program = None
    if ctx.params.runtime == "executorch":
        program = await export_program(ctx, rnd, commit.global_model)
    marks["exported"] = time.perf_counter()
    devices = await wait_for_devices(ctx)
    plan = await open_round(ctx, rnd, devices, list(tree.leaves), commit.global_model, program)
    marks["opened"] = time.perf_counter()

    tracker = ReportTracker(target=plan.target, deadline=plan.deadline)
    leaves = await leaf_level.with_options(flow_run_name=f"{tag}-level-0-leaves")(
        ctx, plan, tracker
    )
    marks["enough"] = tracker.enough_at or marks["opened"]
    marks["collected"] = time.perf_counter()
    refs = {o.leaf: o.partial for o in leaves}
    for nodes in tree.levels[1:-1]:
        level = nodes[0].level
        refs = await aggregator_level.with_options(flow_run_name=f"{tag}-level-{level}")(
            ctx, rnd, list(nodes), refs
        )
    root = await server_level.with_options(flow_run_name=f"{tag}-server")(
        ctx, rnd, tree.root, refs, commit
    )

    marks["aggregated"] = time.perf_counter()
    evaluation = None
    if root.global_model is not None:
        evaluation = await evaluate_model(ctx, rnd, root.global_model)
    marks["evaluated"] = time.perf_counter()
    reason = ""
    if root.global_model is None:
        reason = f"{root.devices} report(s), fewer than min_reports={ctx.params.min_reports}"
    report = RoundReport(
        round=rnd,
        outcome="committed" if root.global_model is not None else "abandoned",
        reason=reason,
        devices_selected=plan.selected,
        devices_reported=root.devices,
        rejected=_sum_counts(o.rejected for o in leaves),
        duplicates=sum(o.duplicates for o in leaves),
        late=late_between(late_before, await read_late_counts(ctx.gateway, ctx.job)),
        train_loss=root.train_metrics.get("loss"),
        train_accuracy=root.train_metrics.get("accuracy"),
        test_loss=evaluation.metrics.get("loss") if evaluation else None,
        test_accuracy=evaluation.metrics.get("accuracy") if evaluation else None,
        eval_dataset=evaluation.dataset if evaluation else None,
        bytes_in=sum(o.bytes_in for o in leaves),
        bytes_out=_bytes_out(program, commit.global_model, root.devices),
        duration_s=time.perf_counter() - started,
        timings=phase_timings(marks),
        global_model=root.global_model or commit.global_model,
        program=program,
        flow_run_id=current_flow_run_id(),
        finished_at=datetime.now(UTC),
    )
    new_commit = await commit_round(ctx, commit, report, root)
    lineage_ref = await asyncio.to_thread(
        store_for(ctx.s3).head, lineage_key(report.global_model.key)
    )
    await publish_round_artifacts(ctx.s3, ctx.job, ctx.run_id, report, lineage_ref)
    logger.info(
        "round %d %s: %d/%d reported, test accuracy %s, %.1fs",
        rnd,
        report.outcome,
        report.devices_reported,
        report.devices_selected,
        "-" if report.test_accuracy is None else f"{100 * report.test_accuracy:.1f}%",
        report.duration_s,
    )
    name = "Completed" if report.outcome == "committed" else "Abandoned"
    return Completed(name=name, message=reason or None, data=new_commit)


def phase_timings(marks: Mapping[str, float]) -> dict[str, float]:
    """Seconds per phase; ``devices`` is the wait for reports, the rest is overhead."""
    order = ["start", "exported", "opened", "enough", "collected", "aggregated", "evaluated"]
    names = ["export", "dispatch", "devices", "close-and-collect", "aggregate", "evaluate"]
    return {
        name: round(marks[b] - marks[a], 4)
        for name, a, b in zip(names, order[:-1], order[1:], strict=True)
    }


def _sum_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _bytes_out(program: ObjectRef | None, model: ObjectRef, devices: int) -> int:
    """Bytes the reporting devices downloaded: the weights, and the program if any."""
    return (model.size + (program.size if program is not None else 0)) * devices


# ---------------------------------------------------------------- the job


@flow(name="federated-training", log_prints=True)
async def federated_training(
    job: str,
    run_id: str = _D.run_id,
    runtime: str = _D.runtime,
    rounds: int = _D.rounds,
    tree: TreeShape = _D.tree,
    cohort_size: int = _D.cohort_size,
    over_selection: float = _D.over_selection,
    min_reports: int = _D.min_reports,
    round_deadline_s: float = _D.round_deadline_s,
    registry_wait_s: float = _D.registry_wait_s,
    local_epochs: int | None = _D.local_epochs,
    max_steps: int | None = _D.max_steps,
    batch_size: int | None = _D.batch_size,
    lr: float | None = _D.lr,
    momentum: float | None = _D.momentum,
    strategy: StrategyConfig = _D.strategy,
    partition: PartitionScheme | None = _D.partition,
    num_devices: int = _D.num_devices,
    dataset: DatasetConfig | None = _D.dataset,
    norm_bound: float | None = _D.norm_bound,
    seed: int = _D.seed,
    eval_samples: int = _D.eval_samples,
) -> list[RoundReport]:
    """Train ``job`` federatedly for ``rounds`` committed rounds; resume by ``run_id``.

    Parameters are validated by ``tasks.params.TrainingParams`` before any work
    starts. Running again with the same ``run_id`` continues from the last
    committed round in S3; no round is applied twice.
    """
    params = TrainingParams.model_validate(dict(locals()))
    ctx = RunContext(params=params, s3=S3Settings(), gateway=GatewaySettings())
    layout = build_tree(params.tree)
    logger = get_run_logger()

    commit = await ensure_initial_model(ctx)
    if commit.next_round > 0:
        logger.info("resuming %s run %s at round %d", job, params.run_id, commit.next_round)
    while commit.next_round < params.rounds:
        state = await training_round.with_options(flow_run_name=f"round-{commit.next_round:04d}")(
            ctx, layout, commit, return_state=True
        )
        commit = await state.result()  # type: ignore[misc]
    reports = await asyncio.to_thread(read_reports, store_for(ctx.s3), commit)
    await publish_job_summary(job, params.run_id, reports)
    await mark_done(ctx, list(layout.leaves), commit)
    for r in reports:
        acc = "-" if r.test_accuracy is None else f"{100 * r.test_accuracy:.1f}%"
        print(
            f"round {r.round:>4}  {r.outcome:<9}  reported {r.devices_reported:>3}  "
            f"test accuracy {acc:>6} ({r.eval_dataset})"
        )
    return reports
