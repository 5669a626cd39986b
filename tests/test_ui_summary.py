"""The run's page in the Prefect UI: a chart of accuracy and loss over rounds, and the table."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime

from infra.run_state import RoundReport
from infra.store import ObjectRef
from tasks.reporting import round_lines
from tasks.ui import artifact_key, summary_markdown

MODEL = ObjectRef(bucket="b", key="m", sha256="0" * 64, size=1)


def report(rnd: int, acc: float | None, loss: float | None) -> RoundReport:
    return RoundReport(
        round=rnd,
        outcome="committed" if acc is not None else "abandoned",
        devices_selected=8,
        devices_reported=6,
        test_accuracy=acc,
        test_loss=loss,
        eval_dataset="synthetic-cifar10-shaped",
        duration_s=1.0,
        global_model=MODEL,
        finished_at=datetime(2026, 12, 1, tzinfo=UTC),
    )


def test_summary_has_an_inline_chart_sparklines_and_every_round() -> None:
    reports = [report(0, 0.1, 2.3), report(1, None, None), report(2, 0.3, 2.0)]
    md = summary_markdown("cifar10-mobile", "default", reports)
    found = re.search(r"!\[[^\]]+\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", md)
    assert found, md
    svg = base64.b64decode(found.group(1)).decode()
    assert svg.startswith("<svg") and "test accuracy" in svg and "round" in svg
    assert "<script" not in svg and "href" not in svg  # nothing the UI would have to fetch
    assert "test accuracy `" in md and "30.00%" in md
    rows = [line for line in md.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "1", "2"]
    assert "| 1 | abandoned | 6/8 | - | - | - |" in md


def test_summary_without_metrics_has_no_chart_and_keys_are_valid() -> None:
    md = summary_markdown("hello-mobile", "r1", [report(0, None, None)])
    assert "data:image" not in md and "| 0 | abandoned |" in md
    assert artifact_key("Hello_Mobile", "run.1", "summary") == "hello-mobile-run-1-summary"


def test_a_regression_job_charts_its_own_metrics() -> None:
    reports = [
        report(r, None, None).model_copy(
            update={
                "outcome": "committed",
                "test_metrics": {"loss": 1.0 / (r + 1), "mse": 2.0 / (r + 1), "mae": 0.5},
            }
        )
        for r in range(3)
    ]
    md = summary_markdown("rings", "r1", reports)
    found = re.search(r"base64,([A-Za-z0-9+/=]+)\)", md)
    assert found
    svg = base64.b64decode(found.group(1)).decode()
    assert "test mse" in svg and "test mae" in svg and "test accuracy" not in svg
    assert "test mse `" in md and "0.6667" in md


def test_round_lines_name_the_jobs_main_metric() -> None:
    classification = report(3, 0.275, 2.0)
    regression = report(4, None, None).model_copy(
        update={"outcome": "committed", "test_metrics": {"loss": 0.2, "mse": 0.125, "mae": 0.3}}
    )
    first, second = round_lines([classification, regression])
    assert first.startswith("round    3  committed") and "test accuracy  27.5%" in first
    assert "test mse  0.125" in second
