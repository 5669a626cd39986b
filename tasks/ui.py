"""What the Prefect UI shows: round progress, round tables, links, job summary, asset events.

The S3 lineage ledger is the source of truth; the UI is a view of it. Artifact
keys allow only lowercase letters, digits and dashes, so every key is built by
``artifact_key``. Lineage also becomes Prefect asset materialisation events
(the events ``@materialize`` emits), which the open-source server keeps for 7
days: enough to browse recent rounds, not an archive.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping, Sequence
from urllib.parse import quote

from prefect import task
from prefect.artifacts import (
    acreate_link_artifact,
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.cache_policies import NONE
from prefect.events import emit_event
from prefect.logging import get_run_logger

from infra.charts import line_chart_svg, sparkline, svg_data_uri
from infra.keys import lineage_key
from infra.lineage import LineageRecord
from infra.run_state import CommitRecord, RoundReport, read_reports
from infra.settings import S3Settings
from infra.store import ObjectRef
from tasks.context import RunContext, store_for
from tasks.reporting import metric_names, test_metrics_of


def artifact_key(*parts: str) -> str:
    """Join parts into a valid artifact key (lowercase letters, digits, dashes)."""
    raw = "-".join(parts).lower()
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", raw)).strip("-")


def object_url(settings: S3Settings, ref: ObjectRef) -> str:
    """A browsable URL for an object: the endpoint's path-style URL, or the AWS console."""
    if settings.endpoint_url:
        return f"{settings.endpoint_url.rstrip('/')}/{ref.bucket}/{quote(ref.key)}"
    return (
        f"https://s3.console.aws.amazon.com/s3/object/{ref.bucket}"
        f"?region={settings.region}&prefix={quote(ref.key)}"
    )


def emit_lineage_events(record: LineageRecord) -> None:
    """One ``prefect.asset.materialization.succeeded`` event per output of a lineage record."""
    related = [
        {"prefect.resource.id": i.uri, "prefect.resource.role": "asset"} for i in record.inputs
    ]
    for out in record.outputs:
        emit_event(
            event="prefect.asset.materialization.succeeded",
            resource={
                "prefect.resource.id": out.uri,
                "prefect.asset.name": out.uri.rsplit("/", 1)[-1],
            },
            related=related,
            payload={"kind": record.kind, "sha256": out.sha256, "parameters": record.parameters},
        )


def warn_refused(
    task_name: str, leaf: str, rejected: Mapping[str, int], examples: Mapping[str, str]
) -> None:
    """Log what a leaf's collection refused, one example a reason (nothing if it refused none)."""
    if rejected:
        get_run_logger().warning(
            "%s %s: refused %s; e.g. %s",
            task_name,
            leaf,
            dict(rejected),
            "; ".join(examples.values()),
        )


class ProgressBar:
    """A progress artifact, updated in the background when its count changes.

    The close task counts uploads and closes the round: the moment it may close
    is on the round's critical path, and an artifact write to Prefect's API is
    tens of milliseconds on SQLite, hundreds under load. So nothing here is
    awaited by the caller: the artifact is created, and then updated to the
    latest count (at most every ``min_interval_s``, and once more when final),
    by one background coroutine at a time in the flow's event loop. A failed
    update is logged, never raised: the UI is a view, S3 the record.
    """

    def __init__(self, description: str, *, total: int, min_interval_s: float = 1.0) -> None:
        self.total = total
        self.min_interval_s = min_interval_s
        self._created = asyncio.ensure_future(
            acreate_progress_artifact(progress=0.0, description=description)
        )
        self._pending: asyncio.Future[None] | None = None
        self._want = 0
        self._shown = 0
        self._at = 0.0

    def show(self, count: int, *, final: bool = False) -> None:
        """Bring the artifact to ``count`` soon (``final``: whatever the interval)."""
        now = time.monotonic()
        if count == self._want or (not final and now - self._at < self.min_interval_s):
            return
        self._want, self._at = count, now
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._push())

    async def _push(self) -> None:
        try:
            artifact_id = await self._created
            while self._shown != self._want:
                count = self._want
                percent = 100.0 if self.total <= 0 else 100.0 * count / self.total
                await aupdate_progress_artifact(
                    artifact_id=artifact_id, progress=min(100.0, max(0.0, percent))
                )
                self._shown = count
        except Exception as exc:  # the UI is a view: a failed update loses no data
            logging.getLogger(__name__).warning("progress artifact not updated: %s", exc)

    async def settled(self) -> None:
        """Wait for the updates in flight (tests; never on the round's path)."""
        await asyncio.gather(self._created, return_exceptions=True)
        if self._pending is not None:
            await self._pending


async def publish_round_artifacts(
    settings: S3Settings, job: str, run_id: str, report: RoundReport, lineage_ref: ObjectRef | None
) -> None:
    """The round's table and links to its program, global model and lineage record."""
    row = {
        "round": report.round,
        "outcome": report.outcome if not report.reason else f"{report.outcome}: {report.reason}",
        "devices selected": report.devices_selected,
        "devices reported": report.devices_reported,
        "rejected": ", ".join(f"{k}={v}" for k, v in sorted(report.rejected.items())) or "0",
        "clipped": ", ".join(f"{k}={v}" for k, v in sorted(report.clipped.items())) or "0",
        "duplicates": report.duplicates,
        "late": report.late,
        "train loss": _fmt(report.train_loss),
        "test accuracy": _pct(report.test_accuracy),
        "test loss": _fmt(report.test_loss),
        "test metrics": metrics_text(test_metrics_of(report)),
        "eval data": report.eval_dataset or "-",
        "device metrics": metrics_text(report.device_metrics),
        "devices evaluated": (
            f"{report.devices_evaluated} ({report.device_eval_samples} examples)"
            if report.device_metrics
            else "-"
        ),
        "bytes in": report.bytes_in,
        "bytes out": report.bytes_out,
        "seconds": round(report.duration_s, 2),
    }
    key = artifact_key(job, run_id, f"round-{report.round:04d}")
    await acreate_table_artifact(table=[row], key=key, description=f"Round {report.round} of {job}")
    links = [
        ("global model", report.global_model),
        ("program", report.program),
        ("lineage", lineage_ref),
    ]
    for label, ref in links:
        if ref is None:
            continue
        await acreate_link_artifact(
            link=object_url(settings, ref),
            link_text=f"{label}: {ref.uri}",
            key=artifact_key(job, run_id, f"round-{report.round:04d}", label),
            description=f"sha256 {ref.sha256}",
        )


def summary_markdown(job: str, run_id: str, reports: Sequence[RoundReport]) -> str:
    """The run's page: a chart of the test metrics over rounds (and the devices' own, for
    rounds with a federated evaluation), sparklines, the table.

    The chart is an SVG inlined as a ``data:`` URI, so the Prefect UI shows it
    with no file server and no S3 credentials in the browser.
    """
    dataset = next((r.eval_dataset for r in reports if r.eval_dataset), "n/a")
    rounds = [r.round for r in reports]
    series = {
        f"test {name}": [test_metrics_of(r).get(name) for r in reports]
        for name in metric_names(reports)
    }
    # Federated evaluation beside the server's: the same metrics, measured by devices.
    device_names = dict.fromkeys(n for r in reports for n in r.device_metrics)
    series |= {
        f"devices {name}": [r.device_metrics.get(name) for r in reports]
        for name in sorted(device_names, key=lambda n: (n != "accuracy", n == "loss", n))
    }
    percent = {label for label in series if label.endswith(" accuracy")}
    lines = [f"# {job} / {run_id}", "", f"Evaluated on **{dataset}**.", ""]
    if any(v is not None for values in series.values() for v in values):
        svg = line_chart_svg(
            series,
            x=rounds,
            title=f"{job} / {run_id}: {', '.join(series)} by round",
            formats=dict.fromkeys(percent, lambda v: f"{100 * v:.0f}%"),
        )
        shown = " · ".join(
            f"{label} `{sparkline(values)}` "
            + (_pct(_last(values)) if label in percent else _fmt(_last(values)))
            for label, values in series.items()
        )
        lines += [f"![{', '.join(series)} by round]({svg_data_uri(svg)})", "", shown, ""]
    lines += [
        "| round | outcome | reported | train loss | test loss | test accuracy | test metrics "
        "| device metrics |",
        "|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r.round} | {r.outcome} | {r.devices_reported}/{r.devices_selected} | "
            f"{_fmt(r.train_loss)} | {_fmt(r.test_loss)} | {_pct(r.test_accuracy)} | "
            f"{metrics_text(test_metrics_of(r))} | {metrics_text(r.device_metrics)} |"
        )
    return "\n".join(lines)


async def publish_job_summary(job: str, run_id: str, reports: Sequence[RoundReport]) -> None:
    """Markdown artifact of the run so far (one key per run, a new version per round)."""
    await acreate_markdown_artifact(
        markdown=summary_markdown(job, run_id, reports),
        key=artifact_key(job, run_id, "summary"),
        description=f"Accuracy and loss per round of {job} run {run_id}",
    )


def metrics_text(metrics: Mapping[str, float]) -> str:
    """``accuracy 81.25%, loss 0.4123``: accuracy first, loss last, ``-`` when empty."""
    names = sorted(metrics, key=lambda n: (n != "accuracy", n == "loss", n))
    parts = [f"{n} {_pct(metrics[n]) if n == 'accuracy' else _fmt(metrics[n])}" for n in names]
    return ", ".join(parts) or "-"


def _last(values: Sequence[float | None]) -> float | None:
    return next((v for v in reversed(values) if v is not None), None)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


@task(name="publish-round", cache_policy=NONE)
async def publish_round(ctx: RunContext, report: RoundReport, commit: CommitRecord) -> None:
    """The round's table and links, and the run's curve so far, in the Prefect UI.

    A view of what S3 holds: the reports are read back from the commit pointer.
    """
    store = store_for(ctx.s3)
    lineage = await asyncio.to_thread(store.head, lineage_key(report.global_model.key))
    await publish_round_artifacts(ctx.s3, ctx.job, ctx.run_id, report, lineage)
    reports = await asyncio.to_thread(read_reports, store, commit)
    await publish_job_summary(ctx.job, ctx.run_id, reports)


@task(name="publish-job-summary", cache_policy=NONE)
async def publish_summary(ctx: RunContext, reports: Sequence[RoundReport]) -> None:
    """The run's accuracy and loss over rounds, as one versioned markdown artifact."""
    await publish_job_summary(ctx.job, ctx.run_id, reports)
