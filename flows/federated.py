"""The ``federated-training`` flow: each round a subflow, each tree level a subflow.

    federated-training                      (one run of a job, resumable by run id)
      round-0000 ... round-NNNN             (one subflow per round)
        export-program, wait-for-devices, open-round
        r0000-level-0  close-round + collect-leaf x L   (device updates -> leaf partials;
                                                          leaf_mode="edge-pool": edge-leaf
                                                          runs on the edge work pool)
                       bound-leaf x outsized leaves      (round 0's check across leaves)
        r0000-level-1  sum-node x ...                    (aggregator levels: partial sums)
        r0000-server   finalize-root: sum, divide once, strategy
        evaluate-model                                   (server: held-out test split)
        r0000-device-evaluation  open-evaluation, close-round + collect-evaluation x L,
                       sum-evaluation                    (every eval_every rounds, beside
                                                          evaluate-model: devices' own data)
        commit-round, publish-round

Subflows are per *level*, not per node, and async with their tasks under
``asyncio.gather``: a sync subflow costs about a second (its heartbeat thread).
Rounds and levels are pipelined (docs/orchestration.md, "Pipelined rounds"): a
round starts all its level subflows at once, chained by in-process handoffs
(``tasks.handoff``), and the next round's flow run is created as this one opens
and opens as soon as this one's root has the new model, while this one still
evaluates and commits. Commits stay strictly in round order. So Prefect's API
calls for creating and finishing runs happen while devices train, not between
one step and the next. Subflows and tasks exchange S3 references and small
results, never tensors or manifests. Every I/O happens in a task; the logic
lives in ``aggregation``, ``edge``, ``infra`` and the pure modules of ``tasks``.
This module tells the story.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from prefect import flow, get_run_logger
from prefect.states import Cancelled, Completed, State

from aggregation.clipping import NormBoundState
from aggregation.strategies.config import StrategyConfig
from aggregation.topology import Node, Tree, TreeShape, build_tree
from edge.data.config import DatasetConfig
from edge.data.partition import PartitionScheme
from flows.edge_leaf import collect_on_edge
from infra.run_state import CommitRecord, RoundReport
from infra.settings import GatewaySettings, S3Settings
from infra.store import ObjectRef
from tasks.aggregate import finalize_root, sum_node
from tasks.collect import check_leaves, close_when_due, collect_leaf
from tasks.context import RunContext
from tasks.dispatch import mark_done, open_round, wait_for_devices
from tasks.evaluation import collect_evaluation, open_evaluation, sum_evaluation
from tasks.gateways import late_between, late_counts
from tasks.handoff import Boundary, Handoff, RoundLink, UpstreamFailedError, handoff
from tasks.models import check_job, create_initial_model, evaluate_model, load_commit
from tasks.params import TrainingParams
from tasks.planning import OpenedRound
from tasks.programs import export_program, export_template
from tasks.reporting import advance, round_lines
from tasks.results import DeviceEvaluation, LeafLevel, RootResult, RoundResults
from tasks.rounds import commit_round, load_reports
from tasks.run_cache import run_cache
from tasks.ui import publish_round, publish_summary

# The flow's signature repeats TrainingParams' fields (Prefect builds its UI form and
# `-p` parsing from the signature); defaults come from this one unvalidated instance.
_D = TrainingParams.model_construct(job="")


# ---------------------------------------------------------------- level subflows
#
# A round starts every level subflow at once; each waits for its input on a Handoff
# and hands its output on the moment it exists (tasks.handoff). The tree's shape,
# each level a subflow with its nodes' tasks, is the same as when they ran one
# after the other; only the API calls that create and finish them no longer sit
# between one level's last sum and the next level's first.
#
# Run names come from templates over the parameters ("{out.source}"), not from
# ``with_options(flow_run_name=...)`` per call: every ``with_options`` builds a new
# Flow, whose parameter JSON schema pydantic regenerates (RunContext and friends),
# which was 15% of the flow process's CPU in a round (py-spy, benchmarks/round_speed.py).


@flow(name="leaf-level", flow_run_name="{out.source}", validate_parameters=False, log_prints=True)
async def leaf_level(ctx: RunContext, opened: Handoff, out: Handoff) -> LeafLevel | State:
    """Every leaf collects its devices' updates while the close task watches the count;
    then round 0's check across leaves bounds any leaf calibrated by outsized updates.

    The leaves run here, or with ``leaf_mode="edge-pool"`` as ``edge-leaf`` runs on
    the edge work pool, children of this subflow (``flows.edge_leaf``).
    """
    try:
        rnd: OpenedRound = await opened.get()
    except UpstreamFailedError as exc:
        return Cancelled(message=str(exc))
    if ctx.params.leaf_mode == "edge-pool":  # each leaf an edge-leaf run beside the gateways
        closing, leaves = await asyncio.gather(
            close_when_due(ctx, rnd),
            collect_on_edge(ctx, rnd.round, rnd.task_refs, rnd.norm_state),
        )
    else:
        closing, *leaves = await asyncio.gather(
            close_when_due(ctx, rnd),
            *(collect_leaf(ctx, leaf, ref, rnd.norm_state) for leaf, ref in rnd.task_refs.items()),
        )
    level = await check_leaves(ctx, rnd.round, LeafLevel(closing=closing, leaves=leaves))
    out.set(level.partials)
    return level


@flow(name="aggregator-level", flow_run_name="{out.source}", validate_parameters=False)
async def aggregator_level(
    ctx: RunContext, rnd: int, nodes: Sequence[Node], children: Handoff, out: Handoff
) -> dict[str, ObjectRef] | State:
    """Every node of one level adds its children's partials."""
    try:
        partials: dict[str, ObjectRef] = await children.get()
    except UpstreamFailedError as exc:
        return Cancelled(message=str(exc))
    refs = await asyncio.gather(
        *(sum_node(ctx, rnd, n.name, n.level, [partials[c] for c in n.children]) for n in nodes)
    )
    sums = {n.name: ref for n, ref in zip(nodes, refs, strict=True)}
    out.set(sums)
    return sums


@flow(name="server-level", flow_run_name="{out.source}", validate_parameters=False)
async def server_level(
    ctx: RunContext, rnd: int, root: Node, children: Handoff, basis: Handoff, out: Handoff
) -> RootResult | State:
    """The root sums the top level, divides once and applies the server strategy."""
    try:
        partials: dict[str, ObjectRef] = await children.get()
        commit: CommitRecord = await basis.get()
    except UpstreamFailedError as exc:
        return Cancelled(message=str(exc))
    result = await finalize_root(
        ctx,
        rnd,
        root.name,
        root.level,
        [partials[c] for c in root.children],
        commit.global_model,
        commit.server_state,
        NormBoundState.model_validate(commit.norm_bound or {}),
    )
    out.set(result)
    return result


async def _level(call: Coroutine[Any, Any, State], out: Handoff) -> Any:
    """Run one level subflow; if it did not complete, its consumers hear so at once."""
    try:
        state = await call
        if state.is_cancelled():
            raise UpstreamFailedError(state.message or f"{state.name}: its input never came")
        return await state.result()  # a failed level raises its own error here
    except BaseException as exc:
        out.fail(exc)
        raise


@dataclass
class Levels:
    """A round's level subflows, started together, chained by handoffs."""

    opened: Handoff  # the round's OpenedRound, from open-round
    root: Handoff  # the server level's RootResult
    runs: list[asyncio.Future[Any]]

    @classmethod
    def start(cls, ctx: RunContext, tree: Tree, rnd: int, basis: Handoff) -> Levels:
        tag = f"r{rnd:04d}"
        opened = handoff(f"{tag} open-round")
        name = f"{tag}-level-0-leaves"
        children = handoff(name)
        calls = [
            _level(
                leaf_level(ctx, opened, children, return_state=True),
                children,
            )
        ]
        for nodes in tree.levels[1:-1]:
            name = f"{tag}-level-{nodes[0].level}"
            out = handoff(name)
            calls.append(
                _level(
                    aggregator_level(ctx, rnd, nodes, children, out, return_state=True),
                    out,
                )
            )
            children = out
        root = handoff(f"{tag}-server")
        calls.append(
            _level(
                server_level(ctx, rnd, tree.root, children, basis, root, return_state=True),
                root,
            )
        )
        return cls(opened=opened, root=root, runs=[asyncio.ensure_future(c) for c in calls])

    async def leaf_level(self) -> LeafLevel:
        return cast(LeafLevel, await self.runs[0])

    async def root_result(self) -> RootResult:
        """The root's result as soon as it exists; else the levels' first own error."""
        try:
            return cast(RootResult, await self.root.get())
        except UpstreamFailedError:
            await self.settle(raise_first=True)
            raise

    async def settle(self, raise_first: bool = False) -> None:
        """Wait for every level subflow to end; optionally raise the first level's own
        error (not one that only says its input never came)."""
        outcomes = await asyncio.gather(*self.runs, return_exceptions=True)
        errors = [e for e in outcomes if isinstance(e, BaseException)]
        own = [e for e in errors if not isinstance(e, UpstreamFailedError)]
        if raise_first and own:
            raise own[0]


# ---------------------------------------------------------------- one round


@flow(
    name="device-evaluation",
    flow_run_name="r{rnd:04d}-device-evaluation",
    validate_parameters=False,
    log_prints=True,
)
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


@flow(
    name="fl-round",
    flow_run_name="round-{link.round:04d}",
    validate_parameters=False,
    log_prints=True,
)
async def training_round(ctx: RunContext, tree: Tree, link: RoundLink) -> State:
    """Export, dispatch, collect, aggregate level by level, evaluate (and on devices), commit.

    Runs beside its neighbours (docs/orchestration.md, "Pipelined rounds"): it opens
    once the round before has its new model (``link.start.basis``), hands its own
    on as soon as its root has one (``link.end.basis``), and commits only after the
    round before has committed (``link.start.committed``).
    """
    levels = Levels.start(ctx, tree, link.round, link.start.basis)
    try:
        return await _play_round(ctx, tree, link, levels)
    except BaseException as exc:
        levels.opened.fail(exc)
        link.start.opened.fail(exc)
        link.end.fail(exc)
        await levels.settle()
        if isinstance(exc, UpstreamFailedError):  # the round before failed: not ours to report
            return Cancelled(message=f"round {link.round} was not committed: {exc}")
        raise


async def _arrival(basis: Handoff) -> tuple[CommitRecord, float]:
    return await basis.get(), time.time()


async def _play_round(ctx: RunContext, tree: Tree, link: RoundLink, levels: Levels) -> State:
    rnd = link.round

    # 0. the model this round trains: the round before's, as soon as its root has it
    waiting = asyncio.ensure_future(_arrival(link.start.basis))
    devices = await wait_for_devices(ctx)
    basis, started = await waiting

    # 1. export the global model to the devices' training program
    program = None
    if ctx.params.runtime == "executorch":
        program = await export_program(ctx, rnd, basis.global_model)

    # 2. dispatch: sample the cohort, write the leaves' tasks, open the round
    reading = asyncio.ensure_future(late_counts(ctx))  # read as the round opens, not before it
    opened = await open_round(ctx, rnd, devices, tree.leaves, basis, program)
    levels.opened.set(opened)
    late_open = await reading
    link.start.opened.set(late_open)

    # 3-4. the level subflows, already running: collect at the leaves until the round
    #      closes, add level by level, and the root applies the strategy
    root = await levels.root_result()
    evaluate_devices = root.global_model is not None and ctx.params.evaluates_on_devices(rnd)
    handed_at = None
    if not evaluate_devices:  # the next round may open now: this one no longer needs the pointer
        link.end.basis.set(advance(basis, root))
        handed_at = time.time()

    # 5. evaluate the new global model on held-out data: the server's test split, and
    #    every eval_every rounds, at the same time, devices on their own held-out data
    evaluation = device_eval = None
    if root.global_model is not None:
        if evaluate_devices:
            evaluation, device_eval = await asyncio.gather(
                evaluate_model(ctx, rnd, root.global_model),
                device_evaluation_level(ctx, rnd, tree.leaves, root.global_model),
            )
            link.end.basis.set(advance(basis, root))
            handed_at = time.time()
        else:
            evaluation = await evaluate_model(ctx, rnd, root.global_model)

    # 6. commit after the round before: the report, then the pointer. Late uploads
    #    count until the next round opened (or now), so overlapping rounds share none.
    committed = await link.start.committed.get()
    late_close = link.end.opened.peek()
    if late_close is None:
        late_close = await late_counts(ctx)
    results = RoundResults(
        program=program,
        opened=opened,
        level=await levels.leaf_level(),
        root=root,
        evaluation=evaluation,
        device_evaluation=device_eval,
        handed_at=handed_at,
    )
    new_commit, report = await commit_round(
        ctx,
        committed,
        results,
        late=late_between(late_open, late_close),
        started_at=started,
        trained=basis.global_model,
    )
    link.end.committed.set(new_commit)
    get_run_logger().info(round_lines([report])[0])
    await levels.settle(raise_first=True)
    return round_state(report, new_commit)


def round_state(report: RoundReport, commit: CommitRecord) -> State:
    """A committed round completes; an abandoned one completes under the name ``Abandoned``."""
    name = "Completed" if report.outcome == "committed" else "Abandoned"
    return Completed(name=name, message=report.reason or None, data=(commit, report))


async def _round_outcome(
    ctx: RunContext,
    call: Coroutine[Any, Any, State],
    link: RoundLink,
    published: asyncio.Future[Any] | None,
) -> tuple[CommitRecord, RoundReport]:
    """A round's commit and report; then its artifacts, drawn after the round before's."""
    try:
        state = await call
        if state.is_cancelled():
            raise UpstreamFailedError(state.message or f"round {link.round} was cancelled")
        commit, report = cast(tuple[CommitRecord, RoundReport], await state.result())
    except BaseException as exc:  # a round that crashed may not have said so itself
        link.start.opened.fail(exc)
        link.end.fail(exc)
        raise
    if published is not None:
        await asyncio.gather(published, return_exceptions=True)
    await publish_round(ctx, report, commit)
    return commit, report


async def play_rounds(ctx: RunContext, layout: Tree, commit: CommitRecord) -> CommitRecord:
    """Every round left to play, each flow run created as the round before opens.

    At most three round flows are alive: one evaluating and committing, one
    collecting, and one waiting for the collecting round's model. The first
    round's own failure is raised once every round has ended; rounds after it
    end Cancelled, uncommitted.
    """
    boundary = Boundary.resumed(commit)
    playing: list[asyncio.Future[tuple[CommitRecord, RoundReport]]] = []
    for rnd in range(commit.next_round, ctx.params.rounds):
        link = RoundLink(round=rnd, start=boundary, end=Boundary.before(rnd + 1))
        call = training_round(ctx, layout, link, return_state=True)
        playing.append(
            asyncio.ensure_future(_round_outcome(ctx, call, link, playing[-1] if playing else None))
        )
        opening = asyncio.ensure_future(boundary.opened.get())
        await asyncio.wait([playing[-1], opening], return_when=asyncio.FIRST_COMPLETED)
        opening.cancel()
        if playing[-1].done() and playing[-1].exception() is not None:
            break
        boundary = link.end
    outcomes = await asyncio.gather(*playing, return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        raise next((e for e in errors if not isinstance(e, UpstreamFailedError)), errors[0])
    return commit if not outcomes else cast(tuple[CommitRecord, RoundReport], outcomes[-1])[0]


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
        commit = await play_rounds(ctx, layout, commit)

    reports = await load_reports(ctx, commit)
    await publish_summary(ctx, reports)
    await mark_done(ctx, layout.leaves, commit)
    for line in round_lines(reports):
        print(line)
    return reports
