"""Pure round planning: who is asked, where their tasks go, and when the round closes.

No I/O here: ``plan_round`` turns the registry, the tree and the run's
parameters into every leaf's ``LeafTask`` and the job's ``ActiveRound``
(``plan_evaluation`` does the same for a round's federated evaluation);
``ClosePolicy`` is the one rule for when a round stops waiting for reports.
The tasks in ``tasks.dispatch`` and ``tasks.collect`` write and watch what
these functions decide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict, Unpack

from pydantic import BaseModel, ConfigDict

from aggregation.clipping import NormBoundState
from aggregation.cohort import pace_seconds, reports_needed, select_cohort
from aggregation.strategies.base import round_hyperparams
from edge.manifests import ActiveRound, DataHint, LeafTask, WorkKind
from edge.round_control import active_round, leaf_tasks
from edge.routing import assign_leaves
from infra.store import ObjectRef
from tasks.params import TrainingParams, local_hyperparams

if TYPE_CHECKING:  # edge.jobs imports torch: an edge worker's leaf run imports this module
    from edge.jobs import JobSpec

# Polls per second the whole fleet may send the gateways while waiting for work.
FLEET_POLLS_PER_SECOND = 200.0

CloseReason = Literal["enough-reports", "deadline"]


@dataclass(frozen=True)
class ClosePolicy:
    """When a round stops waiting: ``target`` reports across all leaves, or its deadline.

    Over-selection (``aggregation.cohort``) asks more devices than ``target``,
    so a round normally closes on reports and the deadline only bounds a round
    whose devices went quiet. A round nobody was asked to train closes at once.
    """

    target: int
    deadline: datetime

    def reason_to_close(self, reported: int, now: datetime) -> CloseReason | None:
        if reported >= self.target:
            return "enough-reports"
        if now >= self.deadline:
            return "deadline"
        return None

    def seconds_left(self, now: datetime) -> float:
        return max(0.0, (self.deadline - now).total_seconds())


class _Round(BaseModel):
    """Who was asked and when the round closes: what a plan and an opened round share."""

    model_config = ConfigDict(frozen=True)

    round: int
    active: ActiveRound
    selected: int
    registered: int
    target: int
    deadline: datetime
    norm_state: NormBoundState

    @property
    def close_policy(self) -> ClosePolicy:
        return ClosePolicy(target=self.target, deadline=self.deadline)


class RoundPlan(_Round):
    """A planned round: every leaf's task and the job's pointer, not yet written."""

    tasks: dict[str, LeafTask]

    def shared(self) -> dict[str, Any]:
        """The fields an ``OpenedRound`` takes over from its plan."""
        return {name: getattr(self, name) for name in _Round.model_fields}


class OpenedRound(_Round):
    """What the levels of a round need: references to its tasks, not the tasks."""

    task_refs: dict[str, ObjectRef]
    started_at: float
    finished_at: float


def data_hint(params: TrainingParams, job: JobSpec) -> DataHint:
    """How simulated devices find their partition (real phones ignore it)."""
    part = params.partition or job.partition
    return DataHint(
        scheme=part.kind,
        num_devices=params.num_devices,
        seed=params.seed,
        alpha=part.alpha,
        shards=part.labels_per_device,
        min_size=part.min_size,
        holdout=params.holdout,
        dataset=(params.dataset or job.default_dataset).model_dump(mode="json"),
    )


def client_hyperparams(params: TrainingParams, job: JobSpec, rnd: int) -> dict[str, Any]:
    """Local training for round ``rnd``: the job's defaults and the run's overrides, then
    the strategy's ``configure_round`` (checked against the job's schema), then a round seed.
    """
    defaults = local_hyperparams(params, job)
    scheduled = round_hyperparams(params.strategy.build(), rnd=rnd, defaults=defaults.model_dump())
    checked = type(defaults).model_validate(scheduled)  # TrainHyperparams: lr > 0, ...
    return {**checked.model_dump(), "seed": params.seed * 100_003 + rnd}


class PlanInputs(TypedDict):
    """What every plan is made from, whatever the devices are asked to do."""

    rnd: int
    devices: Sequence[str]
    leaves: Sequence[str]
    global_model: ObjectRef
    tensor_spec: Mapping[str, tuple[list[int], str]]
    now: datetime
    max_num_samples: NotRequired[int | None]


def plan_round(
    params: TrainingParams,
    job: JobSpec,
    *,
    program: ObjectRef | None,
    norm_state: NormBoundState | None = None,
    **inputs: Unpack[PlanInputs],
) -> RoundPlan:
    """Sample the cohort, route it to leaves, write each leaf's task and the open pointer."""
    hyperparams = client_hyperparams(params, job, inputs["rnd"])
    return _plan(
        params,
        job,
        inputs,
        _Work(
            kind="train", cohort_size=params.cohort_size, program=program, hyperparams=hyperparams
        ),
        norm_state=norm_state or NormBoundState(),
    )


def plan_evaluation(
    params: TrainingParams, job: JobSpec, **inputs: Unpack[PlanInputs]
) -> RoundPlan:
    """Round ``rnd``'s federated evaluation of ``global_model`` (the model the round made).

    A cohort of its own (``eval_cohort_size``, drawn independently of the
    round's training cohort), evaluate tasks naming the job's metrics, no
    program (devices evaluate the safetensors weights), and the same leaves,
    deadline length and pacing as training. It closes at ``eval_cohort_size``
    results or its deadline; there is no minimum, a federated evaluation only
    reports what came in.
    """
    work = _Work(
        kind="evaluate",
        cohort_size=params.evaluation_cohort,
        program=None,
        hyperparams={},
        metrics=job.metric_names,
    )
    return _plan(params, job, inputs, work, norm_state=NormBoundState())


@dataclass(frozen=True)
class _Work:
    """What a training round and an evaluation differ in: the kind-specific part of a plan."""

    kind: WorkKind
    cohort_size: int
    program: ObjectRef | None
    hyperparams: Mapping[str, Any]
    metrics: Sequence[str] = ()


def _plan(
    params: TrainingParams,
    job: JobSpec,
    inputs: PlanInputs,
    work: _Work,
    *,
    norm_state: NormBoundState,
) -> RoundPlan:
    """The one planner: cohort, deadline, every leaf's task, the pointer, the close target."""
    rnd, devices, leaves = inputs["rnd"], inputs["devices"], inputs["leaves"]
    selected = select_cohort(
        devices,
        cohort_size=work.cohort_size,
        over_selection=params.over_selection,
        seed=params.seed,
        rnd=rnd,
        # Training draws the cohort it always drew; another kind draws one of its own.
        purpose="" if work.kind == "train" else work.kind,
    )
    deadline = inputs["now"] + timedelta(seconds=params.round_deadline_s)
    tasks = leaf_tasks(
        job=job.name,
        run_id=params.run_id,
        rnd=rnd,
        selected_by_leaf=assign_leaves(selected, leaves),
        global_model=inputs["global_model"],
        program=work.program,
        tensor_spec=inputs["tensor_spec"],
        hyperparams=work.hyperparams,
        runtime=params.runtime,
        deadline=deadline,
        data_hint=data_hint(params, job),
        max_num_samples=inputs.get("max_num_samples"),
        kind=work.kind,
        metrics=work.metrics,
    )
    active = active_round(
        job=job.name,
        run_id=params.run_id,
        rnd=rnd,
        leaves=leaves,
        status="open",
        opened_at=inputs["now"],
        # Between rounds everyone polls; while a round runs only the unselected do.
        poll_seconds=pace_seconds(len(devices), polls_per_second=FLEET_POLLS_PER_SECOND),
        idle_poll_seconds=pace_seconds(len(devices), polls_per_second=FLEET_POLLS_PER_SECOND / 2),
        kind=work.kind,
    )
    return RoundPlan(
        round=rnd,
        tasks=tasks,
        active=active,
        selected=len(selected),
        registered=len(devices),
        target=reports_needed(cohort_size=work.cohort_size, selected=len(selected)),
        deadline=deadline,
        norm_state=norm_state,
    )
