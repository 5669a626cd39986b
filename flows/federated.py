"""The ``federated-training`` flow: each round a subflow, each tree level a subflow.

    federated-training                      (one run of a job, resumable by run id)
      round-0000 ... round-NNNN             (one subflow per round)
        export-program, wait-for-devices, open-round
        r0000-level-0  close-round + collect-leaf x L   (device updates -> leaf partials;
                                                          leaf_mode="edge-pool": edge-leaf
                                                          runs on the edge work pool)
                       bound-leaf x outsized leaves      (round 0's check across leaves)
        r0000-level-1  sum-node x ...                    (aggregator levels: partial sums)
        r0000-server   sum-root, apply-strategy
        evaluate-model                                   (server: held-out test split)
        r0000-device-evaluation  open-evaluation, close-round + collect-evaluation x L,
                       sum-evaluation                    (every eval_every rounds, beside
                                                          evaluate-model: devices' own data)
        commit-round, publish-round

Subflows are per *level*, not per node, and async with their tasks under
``asyncio.gather``: a sync subflow costs about a second (its heartbeat thread),
so this keeps Prefect's fixed cost per round small (benchmarks/round_overhead.py).
Subflows and tasks exchange S3 references and small results, never tensors or
manifests. Every I/O happens in a task; the logic lives in ``aggregation``,
``edge``, ``infra`` and the pure modules of ``tasks``. This module tells the story.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

from prefect import flow, get_run_logger
from prefect.states import Completed, State

from aggregation.clipping import NormBoundState
from aggregation.strategies.config import StrategyConfig
from aggregation.topology import Node, Tree, TreeShape, build_tree
from edge.data.config import DatasetConfig
from edge.data.partition import PartitionScheme
from flows.edge_leaf import collect_on_edge
from infra.run_state import CommitRecord, RoundReport
from infra.settings import GatewaySettings, S3Settings
from infra.store import ObjectRef
from tasks.aggregate import apply_strategy, sum_node
from tasks.collect import check_leaves, close_when_due, collect_leaf
from tasks.context import RunContext
from tasks.dispatch import mark_done, open_round, wait_for_devices
from tasks.evaluation import collect_evaluation, open_evaluation, sum_evaluation
from tasks.gateways import late_counts, late_since
from tasks.models import check_job, create_initial_model, evaluate_model, load_commit
from tasks.params import TrainingParams
from tasks.planning import OpenedRound
from tasks.programs import export_program, export_template
from tasks.reporting import round_lines
from tasks.results import DeviceEvaluation, LeafLevel, RootResult, RoundResults
from tasks.rounds import commit_round, load_reports
from tasks.run_cache import run_cache
from tasks.ui import publish_round, publish_summary

# The flow's signature repeats TrainingParams' fields (Prefect builds its UI form and
# `-p` parsing from the signature); defaults come from this one unvalidated instance.
_D = TrainingParams.model_construct(job="")


# ---------------------------------------------------------------- level subflows


@flow(name="leaf-level", validate_parameters=False, log_prints=True)
async def leaf_level(ctx: RunContext, opened: OpenedRound) -> LeafLevel:
    """Every leaf collects its devices' updates while the close task watches the count;
    then round 0's check across leaves bounds any leaf calibrated by outsized updates.

    The leaves run here, or with ``leaf_mode="edge-pool"`` as ``edge-leaf`` runs on
    the edge work pool, children of this subflow (``flows.edge_leaf``).
    """
    if ctx.params.leaf_mode == "edge-pool":  # each leaf an edge-leaf run beside the gateways
        closing, leaves = await asyncio.gather(
            close_when_due(ctx, opened),
            collect_on_edge(ctx, opened.round, opened.task_refs, opened.norm_state),
        )
    else:
        closing, *leaves = await asyncio.gather(
            close_when_due(ctx, opened),
            *(
                collect_leaf(ctx, leaf, ref, opened.norm_state)
                for leaf, ref in opened.task_refs.items()
            ),
        )
    return await check_leaves(ctx, opened.round, LeafLevel(closing=closing, leaves=leaves))


@flow(name="aggregator-level", validate_parameters=False)
async def aggregator_level(
    ctx: RunContext, rnd: int, nodes: Sequence[Node], children: dict[str, ObjectRef]
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
    total = await sum_node(ctx, rnd, root.name, root.level, [children[c] for c in root.children])
    return await apply_strategy(
        ctx,
        rnd,
        total,
        commit.global_model,
        commit.server_state,
        NormBoundState.model_validate(commit.norm_bound or {}),
    )


# ---------------------------------------------------------------- one round


@flow(name="device-evaluation", validate_parameters=False, log_prints=True)
async def device_evaluation_level(
    ctx: RunContext, rnd: int, leaves: Sequence[str], model: ObjectRef
) -> DeviceEvaluation:
    """Devices evaluate ``model`` on their own held-out data; their metric sums are added."""
    opened = await open_evaluation(ctx, rnd, leaves, model)
    closing, *outcomes = await asyncio.gather(
        close_when_due(ctx, opened),
        *(collect_evaluation(ctx, leaf, ref) for leaf, ref in opened.task_refs.items()),
    )
    return await sum_evaluation(ctx, opened, model, closing, outcomes)


@flow(name="fl-round", validate_parameters=False, log_prints=True)
async def training_round(ctx: RunContext, tree: Tree, commit: CommitRecord) -> State:
    """Export, dispatch, collect, aggregate level by level, evaluate (and on devices), commit."""
    rnd, tag = commit.next_round, f"r{commit.next_round:04d}"
    late_before = await late_counts(ctx)

    # 1. export the global model to the devices' training program
    program = None
    if ctx.params.runtime == "executorch":
        program = await export_program(ctx, rnd, commit.global_model)

    # 2. dispatch: sample the cohort, write the leaves' tasks, open the round
    devices = await wait_for_devices(ctx)
    opened = await open_round(ctx, rnd, devices, tree.leaves, commit, program)

    # 3. collect device updates at the leaves until the round closes
    level = await leaf_level.with_options(flow_run_name=f"{tag}-level-0-leaves")(ctx, opened)

    # 4. aggregate level by level, then the root applies the strategy
    partials = level.partials
    for nodes in tree.levels[1:-1]:
        partials = await aggregator_level.with_options(
            flow_run_name=f"{tag}-level-{nodes[0].level}"
        )(ctx, rnd, nodes, partials)
    root = await server_level.with_options(flow_run_name=f"{tag}-server")(
        ctx, rnd, tree.root, partials, commit
    )

    # 5. evaluate the new global model on held-out data: the server's test split, and
    #    every eval_every rounds, at the same time, devices on their own held-out data
    evaluation = device_eval = None
    if root.global_model is not None:
        if ctx.params.evaluates_on_devices(rnd):
            evaluation, device_eval = await asyncio.gather(
                evaluate_model(ctx, rnd, root.global_model),
                device_evaluation_level.with_options(flow_run_name=f"{tag}-device-evaluation")(
                    ctx, rnd, tree.leaves, root.global_model
                ),
            )
        else:
            evaluation = await evaluate_model(ctx, rnd, root.global_model)

    # 6. commit: the report, then the pointer (the UI is updated off the critical path)
    results = RoundResults(
        program=program,
        opened=opened,
        level=level,
        root=root,
        evaluation=evaluation,
        device_evaluation=device_eval,
    )
    new_commit, report = await commit_round(
        ctx, commit, results, late=await late_since(ctx, late_before)
    )
    get_run_logger().info(round_lines([report])[0])
    return round_state(report, new_commit)


def round_state(report: RoundReport, commit: CommitRecord) -> State:
    """A committed round completes; an abandoned one completes under the name ``Abandoned``."""
    name = "Completed" if report.outcome == "committed" else "Abandoned"
    return Completed(name=name, message=report.reason or None, data=(commit, report))


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
    max_device_samples: int | None = _D.max_device_samples,
    seed: int = _D.seed,
    eval_samples: int = _D.eval_samples,
    eval_every: int | None = _D.eval_every,
    eval_cohort_size: int | None = _D.eval_cohort_size,
    eval_holdout: float = _D.eval_holdout,
    leaf_mode: Literal["in-process", "edge-pool"] = _D.leaf_mode,
) -> list[RoundReport]:
    """Train ``job`` federatedly for ``rounds`` committed rounds; resume by ``run_id``.

    Parameters are validated by ``tasks.params.TrainingParams`` before any work
    starts. Running again with the same ``run_id`` continues from the last
    committed round in S3; no round is applied twice.
    """
    params = TrainingParams.model_validate(dict(locals()))
    ctx = RunContext(params=params, s3=S3Settings(), gateway=GatewaySettings())
    layout = build_tree(params.tree)

    with run_cache():  # job, program template and evaluation data live as long as this run
        commit = await load_commit(ctx)
        if commit is None:  # a new run: nothing is written for a job that fails its checks
            source = await check_job(ctx)
            if params.runtime == "executorch":
                await export_template(ctx)
            commit = await create_initial_model(ctx, source)
        elif commit.next_round > 0:
            get_run_logger().info(
                "resuming %s run %s at round %d", job, params.run_id, commit.next_round
            )
        publishing: list[asyncio.Task[None]] = []
        while commit.next_round < params.rounds:
            state = await training_round.with_options(
                flow_run_name=f"round-{commit.next_round:04d}"
            )(ctx, layout, commit, return_state=True)
            commit, report = await state.result()  # type: ignore[misc]
            # the round's artifacts are drawn while the next round runs
            publishing.append(asyncio.ensure_future(publish_round(ctx, report, commit)))
        await asyncio.gather(*publishing)

    reports = await load_reports(ctx, commit)
    await publish_summary(ctx, reports)
    await mark_done(ctx, layout.leaves, commit)
    for line in round_lines(reports):
        print(line)
    return reports
