"""What a simulation reports: counters over the whole fleet, a progress line, a table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

StopReason = Literal["done", "rounds", "max_seconds", "fatal", "cancelled"]


@dataclass
class SimulationSummary:
    """What happened, counted over the whole fleet."""

    job: str
    devices: int
    seed: int
    enrolled: int = 0
    polls: int = 0
    tasks_received: int = 0
    trained: int = 0
    updates_sent: int = 0
    accepted: int = 0
    evaluated: int = 0
    evaluations_sent: int = 0
    evaluations_accepted: int = 0
    duplicates: int = 0
    late: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dropouts: int = 0
    offline_skips: int = 0
    train_failures: int = 0
    transport_errors: int = 0
    failovers: int = 0
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    rounds_seen: list[int] = field(default_factory=list)
    stop_reason: StopReason = "cancelled"
    fatal_error: str | None = None
    elapsed_seconds: float = 0.0
    train_seconds: float = 0.0
    dropout_events: list[tuple[str, int]] = field(default_factory=list)
    samples_by_device: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def print_summary(summary: SimulationSummary, console: Console) -> None:
    """The end-of-run table."""
    table = Table(title=f"simulation of {summary.job}: {summary.stop_reason}", show_header=False)
    rows = [
        ("devices (seed)", f"{summary.devices} ({summary.seed})"),
        ("rounds seen", _rounds(summary.rounds_seen)),
        ("tasks received", summary.tasks_received),
        ("trained / failed", f"{summary.trained} / {summary.train_failures}"),
        ("updates sent", summary.updates_sent),
        ("accepted", summary.accepted),
        (
            "evaluations (sent / accepted)",
            f"{summary.evaluated} ({summary.evaluations_sent} / {summary.evaluations_accepted})",
        ),
        ("duplicates", summary.duplicates),
        ("late (409)", summary.late),
        ("rejected", ", ".join(f"{k}={v}" for k, v in sorted(summary.rejected.items())) or "0"),
        ("dropouts", summary.dropouts),
        ("offline skips", summary.offline_skips),
        ("transport errors / failovers", f"{summary.transport_errors} / {summary.failovers}"),
        ("downloaded / uploaded", f"{summary.bytes_downloaded:,} B / {summary.bytes_uploaded:,} B"),
        ("elapsed", f"{summary.elapsed_seconds:.1f} s (training {summary.train_seconds:.1f} s)"),
    ]
    if summary.fatal_error:
        rows.append(("error", f"[red]{summary.fatal_error}[/red]"))
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


def _rounds(rounds: list[int]) -> str:
    if not rounds:
        return "none"
    return f"{rounds[0]}..{rounds[-1]} ({len(rounds)})"
