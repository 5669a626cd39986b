"""Pure round bookkeeping: phase timings, the round report, the next commit pointer.

Everything a round report says is derived here from the steps' results
(``tasks.results``), so the flow only passes results along and the report can
be tested without Prefect, S3 or devices.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

from aggregation.clipping import AdaptiveNormBound
from infra.run_state import CommitRecord, RoundReport
from infra.store import ObjectRef
from tasks.results import RootResult, RoundResults

PHASES = ("export", "dispatch", "devices", "close-and-collect", "aggregate", "evaluate")
DEVICE_EVALUATION = "device-evaluation"


def phase_timings(results: RoundResults) -> dict[str, float]:
    """Seconds per phase; ``devices`` is the wait for reports, the rest is overhead."""
    program, opened, level, root, evaluation = (
        results.program,
        results.opened,
        results.level,
        results.root,
        results.evaluation,
    )
    start = program.started_at if program is not None else opened.started_at
    marks = [
        start,
        program.finished_at if program is not None else start,
        opened.finished_at,
        level.closing.closed_at,
        level.finished_at,
        root.finished_at,
        evaluation.finished_at if evaluation is not None else root.finished_at,
    ]
    timings = {
        name: round(max(0.0, b - a), 4)
        for name, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True)
    }
    device = results.device_evaluation
    if device is not None:  # beside the server's evaluation, not after it
        timings[DEVICE_EVALUATION] = round(max(0.0, device.finished_at - device.started_at), 4)
    return timings


def step_marks(results: RoundResults, start: float) -> dict[str, float]:
    """When the round reached each step (wall clock), for telling overlapping rounds apart."""
    marks = {
        "start": start,
        "opened": results.opened.finished_at,
        "closed": results.level.closing.closed_at,
        "collected": results.level.finished_at,
        "model": results.root.finished_at,
    }
    if results.handed_at is not None:
        marks["handed"] = results.handed_at
    if results.evaluation is not None:
        marks["evaluated"] = results.evaluation.finished_at
    return {name: round(t, 4) for name, t in marks.items()}


def sum_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def bytes_out(program: ObjectRef | None, model: ObjectRef, devices: int) -> int:
    """Bytes the reporting devices downloaded: the weights, and the program if any."""
    return (model.size + (program.size if program is not None else 0)) * devices


def build_round_report(
    results: RoundResults,
    *,
    commit: CommitRecord,
    late: int,
    min_reports: int,
    flow_run_id: str | None,
    now: float,
    round_started_at: float | None = None,
) -> RoundReport:
    """The round's row: outcome, counts, metrics, bytes and phase timings.

    ``duration_s`` runs from ``round_started_at`` (the round flow's start, when
    known) or else from its first step, to ``now``.
    """
    program, opened, level, root, evaluation = (
        results.program,
        results.opened,
        results.level,
        results.root,
        results.evaluation,
    )
    committed = root.global_model is not None
    first = program.started_at if program is not None else opened.started_at
    start = min(first, round_started_at) if round_started_at is not None else first
    metrics = evaluation.metrics if evaluation is not None else {}
    device = results.device_evaluation
    return RoundReport(
        round=opened.round,
        outcome="committed" if committed else "abandoned",
        reason="" if committed else f"{root.devices} report(s), fewer than {min_reports=}",
        devices_selected=opened.selected,
        devices_reported=root.devices,
        rejected=sum_counts(o.rejected for o in level.leaves),
        # per reason; a leaf bounded by round 0's check across leaves adds adaptive-norm-round
        clipped=sum_counts(o.clipped for o in level.leaves),
        median_norm=root.median_norm,
        norm_bound=AdaptiveNormBound().bound(root.norm_state) if root.norm_state else None,
        duplicates=sum(o.duplicates for o in level.leaves),
        late=late,
        train_loss=root.train_metrics.get("loss"),
        train_accuracy=root.train_metrics.get("accuracy"),
        test_loss=metrics.get("loss"),
        test_accuracy=metrics.get("accuracy"),
        eval_dataset=evaluation.dataset if evaluation is not None else None,
        train_metrics=dict(root.train_metrics),
        test_metrics=dict(metrics),
        device_metrics=dict(device.metrics) if device is not None else {},
        devices_evaluated=device.devices if device is not None else 0,
        device_eval_samples=device.samples if device is not None else 0,
        bytes_in=sum(o.bytes_in for o in level.leaves),
        bytes_out=bytes_out(
            program.ref if program is not None else None, commit.global_model, root.devices
        ),
        duration_s=max(0.0, now - start),
        timings=phase_timings(results),
        marks=step_marks(results, start),
        global_model=root.global_model or commit.global_model,
        program=program.ref if program is not None else None,
        flow_run_id=flow_run_id,
        finished_at=datetime.fromtimestamp(now, UTC),
    )


def advance(commit: CommitRecord, root: RootResult) -> CommitRecord:
    """What the next round starts from: ``commit`` moved past a round with ``root``.

    The model, strategy state and norm bound of the record the round will commit,
    known as soon as its root has finished, so the next round can open while this
    one still evaluates and commits (docs/orchestration.md, "Pipelined rounds").
    Its ``reports`` are still the old ones; ``next_commit`` adds the round's report.
    An abandoned round keeps the model and state.
    """
    return commit.model_copy(
        update={
            "next_round": commit.next_round + 1,
            "global_model": root.global_model or commit.global_model,
            "server_state": root.server_state or commit.server_state,
            "norm_bound": (
                root.norm_state.model_dump(mode="json")
                if root.norm_state is not None
                else commit.norm_bound
            ),
        }
    )


def next_commit(
    commit: CommitRecord, report: RoundReport, root: RootResult, report_ref: ObjectRef
) -> CommitRecord:
    """The pointer after a round: ``advance`` plus the round's report."""
    if report.round != commit.next_round:
        raise ValueError(f"round {report.round} cannot follow a commit at {commit.next_round}")
    return advance(commit, root).model_copy(
        update={"reports": [*commit.reports, report_ref], "updated_at": report.finished_at}
    )


def metric_names(reports: Sequence[RoundReport]) -> list[str]:
    """The job's test metrics across a run, accuracy first, then in first-seen order.

    Older reports (before ``test_metrics`` existed) contribute accuracy and loss.
    """
    names: dict[str, None] = {}
    for r in reports:
        names.update(dict.fromkeys(test_metrics_of(r)))
    return sorted(names, key=lambda n: (n != "accuracy", list(names).index(n)))


def test_metrics_of(report: RoundReport) -> dict[str, float]:
    """A report's test metrics; reports written before ``test_metrics`` had two fields."""
    if report.test_metrics:
        return report.test_metrics
    legacy = {"accuracy": report.test_accuracy, "loss": report.test_loss}
    return {k: v for k, v in legacy.items() if v is not None}


def _shown(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if name == "accuracy" else f"{value:.4g}"


def round_lines(reports: Sequence[RoundReport]) -> list[str]:
    """One line per round for the flow's log: outcome, reports and the job's main test metric,
    and beside it the same metric measured by devices when the round evaluated on devices."""
    lines = []
    for r in reports:
        metrics = test_metrics_of(r)
        known = {**r.device_metrics, **metrics}
        main = next((n for n in ("accuracy", "mse", "mae") if n in known), "loss")
        device = ""
        if r.device_metrics:
            device = (
                f"  devices {main} {_shown(main, r.device_metrics.get(main))} "
                f"({r.devices_evaluated} evaluated)"
            )
        lines.append(
            f"round {r.round:>4}  {r.outcome:<9}  reported {r.devices_reported:>3}  "
            f"test {main} {_shown(main, metrics.get(main)):>6} ({r.eval_dataset}){device}  "
            f"{r.duration_s:.1f}s"
        )
    return lines
