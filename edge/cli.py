"""``canopy gateway`` and ``canopy simulate``: the edge side of the command line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from infra.settings import GatewaySettings, S3Settings


def gateway(
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8081,
    host: Annotated[str, typer.Option("--host", help="Interface to bind.")] = "127.0.0.1",
    certfile: Annotated[
        Path | None, typer.Option("--certfile", help="TLS certificate (PEM).")
    ] = None,
    keyfile: Annotated[
        Path | None, typer.Option("--keyfile", help="TLS private key (PEM).")
    ] = None,
    gateway_id: Annotated[
        str | None,
        typer.Option("--gateway-id", help="Name in batch keys and metrics (default: random)."),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run one stateless edge gateway worker (S3 and secrets from CANOPY_* env vars)."""
    from edge.gateway.server import UnsafeGatewayConfig, check_exposure, serve  # uvicorn, boto3

    if (certfile is None) != (keyfile is None):
        raise typer.BadParameter("HTTPS needs both --certfile and --keyfile")
    settings = GatewaySettings()
    try:
        check_exposure(host, settings)
    except UnsafeGatewayConfig as exc:
        raise typer.BadParameter(str(exc), param_hint="--host") from exc
    serve(
        host=host,
        port=port,
        gateway_settings=settings,
        s3_settings=S3Settings(),
        certfile=str(certfile) if certfile else None,
        keyfile=str(keyfile) if keyfile else None,
        gateway_id=gateway_id,
        log_level=log_level,
    )


def simulate(
    job: Annotated[str, typer.Option("--job", help="Job to train (e.g. hello-mobile).")],
    gateway_urls: Annotated[
        str,
        typer.Option(
            "--gateway", help="Gateway base URL(s), comma-separated; devices spread over them."
        ),
    ],
    devices: Annotated[int, typer.Option("--devices", min=1, help="Simulated devices.")] = 100,
    seed: Annotated[
        int, typer.Option("--seed", help="Seeds ids, profiles, dropouts and data.")
    ] = 0,
    runtime: Annotated[
        str,
        typer.Option(
            "--runtime", help="auto (train with whatever the task asks), executorch, or pytorch."
        ),
    ] = "auto",
    until_done: Annotated[
        bool,
        typer.Option("--until-done/--no-until-done", help="Run until the job's round says done."),
    ] = True,
    forever: Annotated[
        bool,
        typer.Option(
            "--forever",
            help="Never stop on its own: after 'done', keep polling for the job's next run "
            "(local stacks). Same as --no-until-done.",
        ),
    ] = False,
    rounds: Annotated[
        int | None,
        typer.Option("--rounds", min=1, help="Stop after this many rounds have been seen."),
    ] = None,
    max_seconds: Annotated[
        float | None, typer.Option("--max-seconds", help="Wall-clock cap.")
    ] = None,
    dropout: Annotated[
        float, typer.Option("--dropout", min=0.0, max=1.0, help="Mean dropout.")
    ] = 0.05,
    slow_fraction: Annotated[float, typer.Option("--slow-fraction", min=0.0, max=1.0)] = 0.2,
    offline_fraction: Annotated[float, typer.Option("--offline-fraction", min=0.0, max=1.0)] = 0.1,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Training processes.")] = 2,
    ca_file: Annotated[
        Path | None, typer.Option("--ca-file", help="CA bundle for HTTPS gateways.")
    ] = None,
    summary_json: Annotated[
        Path | None,
        typer.Option("--summary-json", help="Also write the final summary here as JSON."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No live progress line.")] = False,
) -> None:
    """Play N devices through the public gateway protocol until the job is done."""
    from edge.simulator import SimulationConfig, print_summary, run_simulation

    if runtime not in ("auto", "executorch", "pytorch"):
        raise typer.BadParameter("--runtime must be auto, executorch or pytorch")
    config = SimulationConfig(
        job=job,
        devices=devices,
        gateways=[u.strip().rstrip("/") for u in gateway_urls.split(",") if u.strip()],
        seed=seed,
        runtime=runtime,  # type: ignore[arg-type]
        until_done=until_done and not forever,
        rounds=rounds,
        max_seconds=max_seconds,
        dropout=dropout,
        slow_fraction=slow_fraction,
        offline_fraction=offline_fraction,
        workers=workers,
        enrolment_secret=GatewaySettings().enrolment_secret.get_secret_value(),
        ca_file=str(ca_file) if ca_file else None,
        progress=not quiet,
    )
    summary = asyncio.run(run_simulation(config))
    console = Console()
    print_summary(summary, console)
    if summary_json is not None:
        summary_json.write_text(json.dumps(summary.as_dict(), indent=2))
    if summary.fatal_error:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``gateway`` and ``simulate`` to the ``canopy`` command."""
    app.command("gateway")(gateway)
    app.command("simulate")(simulate)
