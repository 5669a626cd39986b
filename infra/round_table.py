"""The round table of ``canopy report`` and ``canopy demo``, fitted to the terminal.

A rich table wider than the terminal shrinks every column, the narrowest to
nothing: at 80 columns the round numbers vanished. This table instead drops
whole columns, least useful first, until the rest fit at their natural width,
and says which it left out; the round column is never dropped. Under the table,
sparklines show test accuracy and loss over the rounds.
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


@dataclass(frozen=True)
class Column:
    """One column: its header, how a report fills it, and how long it survives narrowing.

    Columns with a smaller ``keep`` are kept longer; two-line headers keep the
    numeric columns as narrow as their numbers.
    """

    header: str
    cell: Callable[[RoundReport], str]
    keep: int
    left: bool = False


COLUMNS: tuple[Column, ...] = (
    Column("round", lambda r: str(r.round), 0),
    Column("outcome", lambda r: r.outcome, 4, left=True),
    Column("devices", lambda r: f"{r.devices_reported}/{r.devices_selected}", 3),
    Column("rejected", lambda r: str(sum(r.rejected.values())), 7),
    Column("train\nloss", lambda r: _loss(r.train_loss), 6),
    Column("test\nloss", lambda r: _loss(r.test_loss), 2),
    Column("test\nacc", lambda r: _pct(r.test_accuracy), 1),
    Column("s", lambda r: f"{r.duration_s:.1f}", 5),
)


class RoundTable:
    """A run's rounds as a table plus accuracy/loss sparklines, at any terminal width."""

    def __init__(self, reports: Sequence[RoundReport], title: str = "") -> None:
        self.reports = list(reports)
        self.title = title

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
        shown = list(COLUMNS)
        dropped: list[Column] = []
        unbounded = options.update(max_width=10_000)  # Measurement.get clamps to max_width
        while True:
            table = self._table(shown, dropped)
            wide = Measurement.get(console, unbounded, table).maximum > options.max_width
            if not wide or len(shown) == 1:
                return table
            least = max(shown, key=lambda c: c.keep)
            shown.remove(least)
            dropped = [c for c in COLUMNS if c is least or c in dropped]

    def curves(self, width: int) -> list[Text]:
        """``test acc  ▁▃▅▇  10.4% -> 27.0%``: one line per metric that has values."""
        lines = []
        for label, values, fmt in (
            ("test acc", [r.test_accuracy for r in self.reports], _pct),
            ("test loss", [r.test_loss for r in self.reports], _loss),
        ):
            known = [v for v in values if v is not None]
            if not known:
                continue
            ends = f"{fmt(known[0])} -> {fmt(known[-1])}"
            room = max(8, width - len(label) - len(ends) - 4)
            line = Text(f"{label:<9} ")
            line.append(sparkline(values, width=room), style="bold cyan")
            line.append(f"  {ends}")
            lines.append(line)
        return lines

    def chart_svg(self) -> str:
        """Test accuracy (%) and loss over rounds as one self-contained SVG."""
        return line_chart_svg(
            {
                "test accuracy (%)": [
                    None if r.test_accuracy is None else 100 * r.test_accuracy for r in self.reports
                ],
                "test loss": [r.test_loss for r in self.reports],
            },
            x=[r.round for r in self.reports],
            title=self.title,
            formats={"test accuracy (%)": lambda v: f"{v:.1f}%", "test loss": lambda v: f"{v:.3f}"},
        )

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.fit(console, options)
        yield from self.curves(options.max_width)
