"""The round table of ``canopy report`` and ``canopy demo``, fitted to the terminal.

A rich table wider than the terminal shrinks every column, the narrowest to
nothing: at 80 columns the round numbers vanished. This table instead drops
whole columns, least useful first, until the rest fit at their natural width,
and says which it left out; the round column is never dropped. Under the table,
sparklines show each test metric over the rounds.

The test columns are the job's own metrics (``RoundReport.test_metrics``):
accuracy and loss for classification, MSE, MAE and loss for regression, or
whatever a job reports; the job's headline metric (accuracy, else MSE, else
the first) is the last column dropped after the round number. A run with a
federated evaluation (``eval_every``) also shows, beside them, the same metrics
measured by devices on their own held-out data (``RoundReport.device_metrics``,
``-`` in rounds without one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from infra.charts import line_chart_svg, sparkline
from infra.run_state import RoundReport


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    """Four decimals while they fit in nine characters, else four significant digits."""
    if x is None:
        return "-"
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.4g}"


# Short labels of well-known metrics (column headers, sparkline labels).
SHORT = {"accuracy": "acc"}
# Headline order: the metrics a reader looks at first; unknown ones follow, loss last.
HEADLINE = ("accuracy", "mse", "mae")


def metrics_of(report: RoundReport) -> dict[str, float]:
    """A report's test metrics; reports written before ``test_metrics`` had two fields."""
    if report.test_metrics:
        return dict(report.test_metrics)
    legacy = {"accuracy": report.test_accuracy, "loss": report.test_loss}
    return {k: v for k, v in legacy.items() if v is not None}


def metric_names(reports: Sequence[RoundReport]) -> list[str]:
    """The run's test metrics in headline order: accuracy, mse, mae, others, loss.

    A run whose rounds have no test metric at all (every round abandoned) still
    shows the classification pair, as dashes.
    """
    seen: dict[str, None] = {}
    for r in reports:
        seen.update(dict.fromkeys(metrics_of(r)))
    names = list(seen) or ["accuracy", "loss"]

    def rank(name: str) -> tuple[int, int]:
        if name in HEADLINE:
            return 0, HEADLINE.index(name)
        return (2 if name == "loss" else 1), names.index(name)

    return sorted(names, key=rank)


def device_metric_names(reports: Sequence[RoundReport]) -> list[str]:
    """The metrics devices reported in the run's federated evaluations, in headline order."""
    seen: dict[str, None] = {}
    for r in reports:
        seen.update(dict.fromkeys(r.device_metrics))
    names = list(seen)
    return sorted(
        names,
        key=lambda n: (0, HEADLINE.index(n)) if n in HEADLINE else (2 if n == "loss" else 1, 0),
    )


def metric_format(name: str) -> Callable[[float | None], str]:
    """Accuracy in percent, loss as before, anything else with :func:`_num`."""
    if name == "accuracy":
        return _pct
    return _loss if name == "loss" else _num


def metric_line(report: RoundReport) -> str:
    """``test accuracy 80.0%, loss 0.4123``: a round's test metrics in headline order, and
    ``; devices accuracy 81.2%, loss 0.3900 (5 evaluated)`` after them when devices
    evaluated the model (a federated evaluation)."""
    metrics = metrics_of(report)
    if metrics:  # an abandoned round has none (metric_names would still name a pair)
        parts = [f"{n} {metric_format(n)(metrics[n])}" for n in metric_names([report])]
        line = f"test {', '.join(parts)}"
    else:
        line = "no test metrics"
    device = report.device_metrics
    if device:
        shown = [f"{n} {metric_format(n)(device[n])}" for n in device_metric_names([report])]
        line += f"; devices {', '.join(shown)} ({report.devices_evaluated} evaluated)"
    return line


@dataclass(frozen=True)
class Column:
    """One column: its header, how a report fills it, and how long it survives narrowing.

    Columns with a smaller ``keep`` are kept longer; two-line headers keep the
    numeric columns as narrow as their numbers.
    """

    header: str
    cell: Callable[[RoundReport], str]
    keep: float
    left: bool = False


def _metric_column(name: str, keep: float) -> Column:
    fmt = metric_format(name)
    return Column(f"test\n{SHORT.get(name, name)}", lambda r: fmt(metrics_of(r).get(name)), keep)


def _device_column(name: str, keep: float) -> Column:
    fmt = metric_format(name)

    def cell(r: RoundReport) -> str:
        return fmt(r.device_metrics.get(name))

    return Column(f"device\n{SHORT.get(name, name)}", cell, keep)


def columns_for(metrics: Sequence[str], device: Sequence[str] = ()) -> tuple[Column, ...]:
    """The table's columns for a job reporting ``metrics`` (in headline order), and
    ``device`` metrics from federated evaluations, if any.

    Test metrics are kept longest after the round (in their order), then the
    devices' metrics; then outcome and devices; train loss, timing and
    rejections go first.
    """
    step = 1.0 / max(len(metrics), 1)
    device_step = 0.9 / max(len(device), 1)
    return (
        Column("round", lambda r: str(r.round), 0),
        Column("outcome", lambda r: r.outcome, 4, left=True),
        Column("devices", lambda r: f"{r.devices_reported}/{r.devices_selected}", 3),
        Column("rejected", lambda r: str(sum(r.rejected.values())), 7),
        Column("train\nloss", lambda r: _loss(r.train_loss), 6),
        *(_metric_column(name, 1 + i * step) for i, name in enumerate(metrics)),
        *(_device_column(name, 2 + i * device_step) for i, name in enumerate(device)),
        Column("s", lambda r: f"{r.duration_s:.1f}", 5),
    )


# The columns of a classification job (accuracy and loss), the most common table.
COLUMNS: tuple[Column, ...] = columns_for(["accuracy", "loss"])


class RoundTable:
    """A run's rounds as a table plus one sparkline per test metric, at any terminal width."""

    def __init__(self, reports: Sequence[RoundReport], title: str = "") -> None:
        self.reports = list(reports)
        self.title = title
        self.metrics = metric_names(self.reports)
        self.device_metrics = device_metric_names(self.reports)
        self.columns = columns_for(self.metrics, self.device_metrics)

    def _table(self, columns: Sequence[Column], dropped: Sequence[Column]) -> Table:
        caption = None
        if dropped:
            names = ", ".join(c.header.replace("\n", " ") for c in dropped)
            caption = f"not shown at this width: {names}"
        table = Table(title=self.title or None, caption=caption)
        for col in columns:
            table.add_column(col.header, justify="left" if col.left else "right", no_wrap=True)
        for report in self.reports:
            table.add_row(*(col.cell(report) for col in columns))
        return table

    def fit(self, console: Console, options: ConsoleOptions) -> Table:
        """The table with the most useful columns that fit in ``options.max_width``."""
        shown = list(self.columns)
        dropped: list[Column] = []
        unbounded = options.update(max_width=10_000)  # Measurement.get clamps to max_width
        while True:
            table = self._table(shown, dropped)
            wide = Measurement.get(console, unbounded, table).maximum > options.max_width
            if not wide or len(shown) == 1:
                return table
            least = max(shown, key=lambda c: c.keep)
            shown.remove(least)
            dropped = [c for c in self.columns if c is least or c in dropped]

    def _series(self) -> list[tuple[str, str, list[float | None]]]:
        """(where, metric, values per round): the test metrics, then the devices' ones."""
        return [
            *(("test", n, [metrics_of(r).get(n) for r in self.reports]) for n in self.metrics),
            *(
                ("device", n, [r.device_metrics.get(n) for r in self.reports])
                for n in self.device_metrics
            ),
        ]

    def curves(self, width: int) -> list[Text]:
        """``test acc  ▁▃▅▇  10.4% -> 27.0%``: one line per metric that has values."""
        lines = []
        series = self._series()
        pad = max([9, *(len(f"{w} {SHORT.get(n, n)}") for w, n, _ in series)])
        for where, name, values in series:
            label, fmt = f"{where} {SHORT.get(name, name)}", metric_format(name)
            known = [v for v in values if v is not None]
            if not known:
                continue
            ends = f"{fmt(known[0])} -> {fmt(known[-1])}"
            room = max(8, width - pad - len(ends) - 4)
            line = Text(f"{label:<{pad}} ")
            line.append(sparkline(values, width=room), style="bold cyan")
            line.append(f"  {ends}")
            lines.append(line)
        return lines

    def chart_svg(self) -> str:
        """Every test (and device) metric over rounds as one self-contained SVG (accuracy in %)."""
        series: dict[str, list[float | None]] = {}
        formats: dict[str, Callable[[float], str]] = {}
        for where, name, values in self._series():
            if name == "accuracy":
                label = f"{where} accuracy (%)"
                series[label] = [None if v is None else 100 * v for v in values]
                formats[label] = lambda v: f"{v:.1f}%"
            else:
                label = f"{where} {name}"
                series[label] = values
                formats[label] = lambda v: f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
        return line_chart_svg(
            series, x=[r.round for r in self.reports], title=self.title, formats=formats
        )

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.fit(console, options)
        yield from self.curves(options.max_width)
