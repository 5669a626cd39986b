"""The round table shows every round number at any terminal width, plus the curves."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from flows.cli import app
from infra.charts import BLOCKS
from infra.round_table import COLUMNS, RoundTable, metric_line
from infra.run_state import CommitRecord, RoundReport, write_commit, write_report
from infra.settings import S3Settings
from infra.store import ObjectRef, S3ObjectStore

REF = ObjectRef(
    bucket="canopy", key="job/run/round-00000/global.safetensors", sha256="0" * 64, size=1
)
TITLE = "cifar10-mobile / demo-20261201-225500 — evaluated on synthetic-cifar10-shaped"


def _reports(n: int = 12) -> list[RoundReport]:
    """Rounds whose accuracy rises; round 2 was abandoned (no evaluation)."""
    return [
        RoundReport(
            round=i,
            outcome="abandoned" if i == 2 else "committed",
            devices_selected=11,
            devices_reported=2 if i == 2 else 8,
            rejected={"stale": 1} if i == 3 else {},
            train_loss=2.2 - 0.05 * i,
            test_loss=None if i == 2 else 2.3 - 0.06 * i,
            test_accuracy=None if i == 2 else 0.104 + 0.04 * i,
            eval_dataset="synthetic-cifar10-shaped",
            duration_s=41.2,
            global_model=REF,
            finished_at=datetime.now(UTC),
        )
        for i in range(n)
    ]


def _render(width: int, reports: list[RoundReport]) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(RoundTable(reports, TITLE))
    return console.export_text()


def _first_cells(text: str) -> list[str]:
    """The first cell of every body row (rows start with '│')."""
    return [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]


@pytest.mark.parametrize("width", [40, 80, 200])
def test_every_round_number_is_shown_at_any_width(width: int) -> None:
    reports = _reports()

    text = _render(width, reports)

    assert _first_cells(text) == [str(r.round) for r in reports]
    assert all(len(line) <= width for line in text.splitlines())
    assert "…" not in text.split("not shown")[0]  # no cell is cut to an ellipsis


def test_80_columns_show_every_column_and_narrower_ones_say_what_they_left_out() -> None:
    reports = _reports()

    wide, narrow = _render(80, reports), _render(40, reports)

    assert "not shown" not in wide
    assert "committed" in wide and "abandoned" in wide and "8/11" in wide
    assert "not shown at this width:" in narrow
    # the most useful columns survive: round, test accuracy, test loss
    header = "\n".join(line for line in narrow.splitlines() if line.startswith("┃"))
    for kept in ("round", "test", "acc", "loss"):
        assert kept in header
    caption = " ".join(narrow.split("not shown at this width:")[1].split())
    assert "rejected" in caption and "train loss" in caption


def test_columns_are_dropped_least_useful_first() -> None:
    order = [c.header for c in sorted(COLUMNS, key=lambda c: c.keep)]

    assert order[:3] == ["round", "test\nacc", "test\nloss"]
    assert order[-1] == "rejected"


def test_sparklines_follow_accuracy_and_loss_with_a_gap_for_the_abandoned_round() -> None:
    text = _render(80, _reports(5))

    acc = next(line for line in text.splitlines() if line.startswith("test acc"))
    loss = next(line for line in text.splitlines() if line.startswith("test loss"))
    spark = re.search(f"[{BLOCKS}][{BLOCKS} ]*[{BLOCKS}]", acc)
    assert (
        spark is not None and spark.group() == BLOCKS[0] + BLOCKS[2] + " " + BLOCKS[5] + BLOCKS[7]
    )
    assert acc.endswith("10.4% -> 26.4%")
    assert loss.endswith("2.3000 -> 2.0600")


def test_chart_svg_has_accuracy_in_percent_and_loss() -> None:
    root = ET.fromstring(RoundTable(_reports(5), TITLE).chart_svg())

    svg = "{http://www.w3.org/2000/svg}"
    names = [g.attrib["data-series"] for g in root.iter(f"{svg}g")]
    assert names == ["test accuracy (%)", "test loss"]
    texts = [t.text for t in root.iter(f"{svg}text")]
    assert "26.4%" in texts and "10.4%" in texts


def test_canopy_report_prints_the_table_and_writes_the_chart(
    s3_env: S3Settings, tmp_path: Path
) -> None:
    # Prepare: a run with three committed rounds in S3
    store = S3ObjectStore(s3_env)
    refs = [write_report(store, "xor-mobile", "r1", r) for r in _reports(3)]
    write_commit(
        store,
        CommitRecord(
            job="xor-mobile",
            run_id="r1",
            next_round=3,
            global_model=REF,
            reports=refs,
            updated_at=datetime.now(UTC),
        ),
    )
    chart = tmp_path / "curves.svg"

    # Execute
    result = CliRunner().invoke(
        app, ["report", "xor-mobile", "--run-id", "r1", "--svg", str(chart)]
    )

    # Assert
    assert result.exit_code == 0, result.output
    assert _first_cells(result.output) == ["0", "1", "2"]
    assert "test acc" in result.output and "test loss" in result.output
    assert ET.fromstring(chart.read_text()).tag == "{http://www.w3.org/2000/svg}svg"


def test_canopy_report_of_an_unknown_run_fails(s3_env: S3Settings) -> None:
    S3ObjectStore(s3_env)  # creates the bucket

    result = CliRunner().invoke(app, ["report", "xor-mobile", "--run-id", "nope"])

    assert result.exit_code == 1
    assert "no committed round" in result.output


def test_the_round_line_of_an_abandoned_round_says_it_has_no_metrics() -> None:
    # what `canopy demo` prints as each round lands; an abandoned round once raised KeyError
    committed, abandoned = _reports(3)[1:]
    assert metric_line(committed) == "test accuracy 14.4%, loss 2.2400"
    assert metric_line(abandoned) == "no test metrics"
