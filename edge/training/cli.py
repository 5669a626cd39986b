"""``canopy jobs``, ``canopy parity``, ``canopy export`` and ``canopy upload-cifar10``.

``parity`` exits non-zero when ExecuTorch and PyTorch training differ by more
than the tolerance; ``export`` writes a program only after it passed that gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from aggregation.tensors import TensorDict, decode_tensors
from edge.data.cifar10 import upload_cifar10
from edge.data.errors import DatasetUnavailableError
from edge.jobs.registry import BUILTIN_JOBS, get_job
from edge.jobs.spec import JobSpec
from edge.training.errors import ExportError
from edge.training.parity import DEFAULT_TOLERANCE, MIN_STEPS, ParityReport, check_parity
from edge.training.publish import export_verified
from edge.training.state import initial_state
from infra.errors import CanopyError, ConfigError
from infra.settings import S3Settings
from infra.store import S3ObjectStore

console = Console()

JobArg = Annotated[
    str, typer.Argument(help="Built-in job name, package.module:ATTR or path/file.py:ATTR.")
]


def _job(ref: str) -> JobSpec:
    try:
        return get_job(ref)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _state(job: JobSpec, state_file: Path | None, seed: int) -> TensorDict:
    if state_file is None:
        return initial_state(job, seed)
    try:
        tensors, _ = decode_tensors(state_file.read_bytes(), source=str(state_file))
    except (OSError, CanopyError) as exc:
        console.print(f"[red]error:[/red] cannot read model state {state_file}: {exc}")
        raise typer.Exit(2) from exc
    return tensors


def _parity_table(report: ParityReport) -> Table:
    table = Table(title=f"{report.job}: ExecuTorch vs PyTorch after {report.steps} SGD steps")
    table.add_column("tensor")
    table.add_column("max |ET - PyTorch|", justify="right")
    for name, diff in report.per_tensor.items():
        style = "" if diff <= report.tolerance else "red"
        table.add_row(name, f"{diff:.3e}", style=style)
    return table


def jobs() -> None:
    """List the built-in jobs (user jobs are given as module:ATTR or file.py:ATTR)."""
    table = Table(title="built-in jobs")
    for column in ("name", "runtimes", "program", "description"):
        table.add_column(column)
    for name, job in sorted(BUILTIN_JOBS.items()):
        program = "ExecuTorch" if job.has_program else "none (numpy)"
        table.add_row(name, ", ".join(sorted(job.runtimes)), program, job.description)
    console.print(table)


def parity(
    job: JobArg,
    steps: Annotated[int, typer.Option(help=f"SGD steps (>= {MIN_STEPS}).")] = MIN_STEPS,
    tol: Annotated[float, typer.Option(help="Largest allowed weight diff.")] = DEFAULT_TOLERANCE,
    momentum: Annotated[float, typer.Option(help="SGD momentum (> 0).")] = 0.9,
    batch_size: Annotated[int | None, typer.Option(help="Default: the job's.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the start state and batches.")] = 0,
) -> None:
    """Train the ExecuTorch program and eager PyTorch identically; fail above the tolerance."""
    spec = _job(job)
    try:
        report = check_parity(
            spec, steps=steps, momentum=momentum, tol=tol, batch_size=batch_size, seed=seed
        )
    except CanopyError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    if not spec.has_program:
        console.print(
            f"[dim]{spec.name} has no program: both runtimes run the same numpy code[/dim]"
        )
    console.print(_parity_table(report))
    verdict = "[green]PASS[/green]" if report.passed else "[red]FAIL[/red]"
    console.print(
        f"max abs difference {report.max_abs_diff:.3e} (tolerance {tol:.1e}) {verdict}; "
        f"mean loss ET {report.loss_executorch:.6f} / PyTorch {report.loss_pytorch:.6f}"
    )
    if not report.passed:
        raise typer.Exit(1)


def export(
    job: JobArg,
    out: Annotated[Path, typer.Option(help="Where to write the .pte training program.")],
    state_file: Annotated[
        Path | None,
        typer.Option("--state", help="Model state (.safetensors) to bake in; default: initial."),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Default: the job's.")] = None,
    tol: Annotated[float, typer.Option(help="Parity tolerance to pass.")] = DEFAULT_TOLERANCE,
    seed: Annotated[int, typer.Option(help="Seed of the initial state and parity batches.")] = 0,
) -> None:
    """Export a job's ExecuTorch training program, only if it passes the parity gate."""
    spec = _job(job)
    state = _state(spec, state_file, seed)
    try:
        verified = export_verified(spec, state, batch_size=batch_size, seed=seed, tol=tol)
    except ExportError as exc:
        console.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(1) from exc
    except CanopyError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    if verified is None:
        console.print(
            f"[yellow]{spec.name} has no ExecuTorch program[/yellow]: it is a closed-form job "
            "that every runtime trains with numpy; nothing written"
        )
        raise typer.Exit(1)
    info = verified.program.info
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(verified.program.pte)
    console.print(
        f"wrote {out}  sha256 {info.sha256}  size {info.size_bytes} bytes  "
        f"batch {info.batch_size}  parity {verified.parity.max_abs_diff:.3e} "
        f"(tolerance {tol:.1e})  export {info.export_seconds:.1f}s"
    )


def upload_cifar10_command(
    folder: Annotated[
        Path, typer.Argument(help="Folder with cifar-10-batches-py/ (or the files).")
    ],
    prefix: Annotated[str, typer.Option(help="Key prefix in the bucket.")] = "datasets/cifar10/",
) -> None:
    """Copy the official CIFAR-10 batch files into the Canopy bucket (for source=cifar10-s3)."""
    store = S3ObjectStore(S3Settings())
    try:
        keys = upload_cifar10(store, folder, prefix)
    except DatasetUnavailableError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"uploaded {len(keys)} files to s3://{store.bucket}/{prefix}")


def register(app: typer.Typer) -> None:
    app.command("jobs")(jobs)
    app.command("parity")(parity)
    app.command("export")(export)
    app.command("upload-cifar10")(upload_cifar10_command)
