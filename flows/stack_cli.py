"""``canopy up``, ``down``, ``deploy``, ``report`` and ``demo`` (what ``make run`` runs).

Every command that takes a job takes any reference (a built-in name,
``package.module:ATTR`` or ``path/to/file.py:ATTR``); what reaches S3 keys,
gateways and deployment names is the job's declared name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edge.data.errors import DatasetUnavailableError
from edge.jobs import get_job
from flows import stack
from flows.deployments import DeploymentSpec, job_deployment, load_deployment_specs
from infra import postgres
from infra.errors import CanopyError, ConfigError
from infra.round_table import RoundTable, metric_line
from infra.run_state import CommitRecord, read_commit, read_reports
from infra.settings import S3Settings
from infra.store import S3ObjectStore

DEFAULT_ROOT = Path(".canopy/stack")
console = Console()


_PORTS = stack.StackPorts()
_FLEET = stack.SimulatedFleet()
_GATEWAY_PORTS = ",".join(str(p) for p in _PORTS.gateways)

PrefectPort = Annotated[
    int, typer.Option("--prefect-port", min=1, max=65535, help="Prefect server and UI port.")
]
S3Port = Annotated[int, typer.Option("--s3-port", min=1, max=65535, help="moto S3 server port.")]
GatewayPorts = Annotated[
    str, typer.Option("--gateway-ports", help="Gateway ports, comma-separated: one per gateway.")
]
PostgresPort = Annotated[
    int,
    typer.Option(
        "--postgres-port", min=1, max=65535, help="PostgreSQL port (with --database postgres)."
    ),
]


class Database(StrEnum):
    sqlite = "sqlite"
    postgres = "postgres"


DatabaseOption = Annotated[
    Database,
    typer.Option(
        "--database",
        help="Prefect server's database: sqlite (a file in --root) or postgres (a PostgreSQL "
        "server the stack starts, from Debian's postgresql package; its data in "
        "--root/postgres).",
    ),
]
Devices = Annotated[int, typer.Option("--devices", min=1, help="Simulated devices per job.")]
EdgeWorkers = Annotated[
    int,
    typer.Option(
        "--edge-workers",
        min=0,
        help="Start N Prefect process workers of the 'edge' work pool and run every "
        "deployment's leaves there (leaf_mode: edge-pool); 0 keeps leaves in the flow.",
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the simulated device population.")]
Dropout = Annotated[
    float,
    typer.Option("--dropout", min=0.0, max=1.0, help="Mean chance a device abandons a round."),
]
SlowFraction = Annotated[
    float, typer.Option("--slow-fraction", min=0.0, max=1.0, help="Share of slow phones.")
]
OfflineFraction = Annotated[
    float,
    typer.Option(
        "--offline-fraction", min=0.0, max=1.0, help="Share of phones offline some rounds."
    ),
]


# What a shell needs to run deployments and read the stack's S3 (`canopy report`,
# `canopy lineage`): moto takes any key, but boto3 signs nothing without one.
STACK_CLIENT_ENV = (
    "PREFECT_API_URL",
    "CANOPY_S3_ENDPOINT_URL",
    "CANOPY_S3_ACCESS_KEY_ID",
    "CANOPY_S3_SECRET_ACCESS_KEY",
)


def _ports(
    prefect_port: int, s3_port: int, gateway_ports: str, postgres_port: int | None = None
) -> stack.StackPorts:
    try:
        gateways = tuple(int(p) for p in gateway_ports.split(",") if p.strip())
    except ValueError as exc:
        raise typer.BadParameter(
            f"--gateway-ports must be comma-separated port numbers, got {gateway_ports!r}"
        ) from exc
    if not gateways or not all(0 < p < 65536 for p in gateways):
        raise typer.BadParameter("--gateway-ports needs at least one port in 1-65535")
    return stack.StackPorts(
        prefect=prefect_port, s3=s3_port, gateways=gateways, postgres=postgres_port
    )


def _start(
    root: Path,
    jobs: tuple[str, ...],
    ports: stack.StackPorts,
    fleet: stack.SimulatedFleet,
    edge_workers: int = 0,
) -> stack.StackRecord:
    console.print(f"[bold]Starting the Canopy stack[/bold] (logs in {root}/logs)")
    try:
        return stack.up(
            root,
            ports=ports,
            jobs=jobs,
            fleet=fleet,
            edge_workers=edge_workers,
            log=console.print,
        )
    except stack.StackError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


def up(
    root: Path = typer.Option(DEFAULT_ROOT, help="Folder for logs, pids and Prefect's database."),
    jobs: str = typer.Option(
        ",".join(stack.DEFAULT_JOBS),
        help="Jobs to simulate devices for, comma-separated: built-in names, "
        "package.module:ATTR or path/to/file.py:ATTR.",
    ),
    devices: Devices = _FLEET.devices,
    seed: Seed = _FLEET.seed,
    dropout: Dropout = _FLEET.dropout,
    slow_fraction: SlowFraction = _FLEET.slow_fraction,
    offline_fraction: OfflineFraction = _FLEET.offline_fraction,
    prefect_port: PrefectPort = _PORTS.prefect,
    s3_port: S3Port = _PORTS.s3,
    gateway_ports: GatewayPorts = _GATEWAY_PORTS,
    database: DatabaseOption = Database.sqlite,
    postgres_port: PostgresPort = postgres.DEFAULT_PORT,
    edge_workers: EdgeWorkers = 0,
) -> None:
    """Start Prefect (on SQLite, or PostgreSQL with --database postgres), moto S3,
    gateways, a runner and device simulators."""
    fleet = stack.SimulatedFleet(devices, seed, dropout, slow_fraction, offline_fraction)
    on_postgres = database == Database.postgres
    ports = _ports(prefect_port, s3_port, gateway_ports, postgres_port if on_postgres else None)
    references = tuple(j.strip() for j in jobs.split(",") if j.strip())
    record = _start(root, references, ports, fleet, edge_workers)
    console.print(f"\nPrefect UI: [link]{record.env['CANOPY_PREFECT_UI_URL']}[/link]")
    console.print("Use the stack from another shell with:")
    for name in STACK_CLIENT_ENV:
        console.print(f"  export {name}={record.env[name]}")
    for line in _next_steps(root, record):
        console.print(f"  {line}")


def _next_steps(root: Path, record: stack.StackRecord) -> list[str]:
    """A deployment run per simulated job: its deployment, or the deploy it needs first."""
    specs = stack.all_deployment_specs(root)
    lines = []
    for job in record.jobs:
        deployed = [s.name for s in specs if _reference_of(s) == job.reference]
        if not deployed:
            lines.append(f"canopy deploy {job.reference}")
            deployed = [job.name]
        lines.append(f"prefect deployment run federated-training/{deployed[0]} --watch")
    return lines


def _reference_of(spec: DeploymentSpec) -> str:
    """The job reference a deployment runs, with file paths absolute like the stack's."""
    return stack.canonical_reference(str(spec.parameters.get("job", "")))


def down(root: Path = typer.Option(DEFAULT_ROOT, help="Folder `canopy up` used.")) -> None:
    """Stop exactly what `canopy up` started."""
    n = stack.down(root, log=console.print)
    console.print(f"stopped {n} service(s)")


def _job_name(job: str) -> str:
    """A job's declared name: the argument itself, or what its reference declares."""
    if ":" not in job:  # names never contain ':'; references always do
        return job
    try:
        return get_job(job).name
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _parse_params(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` flow parameters; values are JSON when they parse as JSON (as Prefect's
    ``-p``), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"-p takes key=value, got {pair!r}", param_hint="-p")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _check_deployable(spec: DeploymentSpec) -> None:
    """The run the deployment would start passes the job's checks (model, data, partition)."""
    from edge.training.validate import validate_job  # torch work, only when deploying
    from tasks.params import TrainingParams

    params = TrainingParams.model_validate(spec.parameters)
    job = get_job(params.job)
    config = params.dataset or job.default_dataset
    validate_job(
        job,
        job.dataset(config),
        scheme=params.partition or job.partition,
        num_devices=params.num_devices,
        seed=params.seed,
    )


def deploy(
    job: str | None = typer.Argument(
        None, help="Job to deploy: path/to/file.py:ATTR, package.module:ATTR or a built-in name."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Deployment name (default: the job's declared name)."
    ),
    runtime: str | None = typer.Option(
        None, "--runtime", help="executorch or pytorch (default: executorch for networks)."
    ),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Rounds a run commits."),
    devices: int | None = typer.Option(
        None,
        "--devices",
        min=1,
        help="Simulated devices the data is split across (num_devices; default: the "
        "running stack's fleet, else 40).",
    ),
    params: list[str] = typer.Option(
        [], "-p", "--param", help="More flow parameters as key=value (JSON values), repeatable."
    ),
    file: Path | None = typer.Option(
        None,
        "--file",
        help="Instead of JOB: register every deployment of your own prefect.yaml-shaped file.",
    ),
    root: Path = typer.Option(DEFAULT_ROOT, help="Folder of the local stack."),
) -> None:
    """Register a deployment of federated-training for a job on the local stack.

    The stack's runner serves it (now if `canopy up` is running, else from the next
    `canopy up`), so `prefect deployment run federated-training/NAME --watch` runs it.
    """
    if (job is None) == (file is None):
        raise typer.BadParameter("give a JOB reference or --file, not both")
    try:
        if file is not None:
            specs = _file_specs(file)
        else:
            assert job is not None
            running = stack.running_record(root)
            num_devices = devices or (running.devices if running and running.devices else 40)
            spec = job_deployment(
                job,
                get_job(job),
                name=name,
                runtime=runtime,
                rounds=rounds,
                num_devices=num_devices,
                overrides=_parse_params(params),
            )
            specs = [spec]
        for spec in specs:
            _check_deployable(spec)
        served = stack.deploy(root, specs, log=console.print)
    except (CanopyError, DatasetUnavailableError, ValueError) as exc:  # ValueError: pydantic
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    for spec in specs:
        state = "served by the stack's runner" if served else "recorded"
        console.print(
            f"deployment [bold]federated-training/{spec.name}[/bold] ({state}): "
            f"job {spec.parameters['job']}, runtime {spec.parameters.get('runtime')}, "
            f"{spec.parameters.get('rounds')} rounds, {spec.parameters.get('num_devices')} devices"
        )
        console.print(f"  prefect deployment run federated-training/{spec.name} --watch")


def _file_specs(path: Path) -> list[DeploymentSpec]:
    """The deployments of a user's own prefect.yaml-shaped file, job file paths made
    absolute (relative to where the command runs, as for `canopy deploy JOB`)."""
    specs = load_deployment_specs(path)
    if not specs:
        raise ConfigError(f"{path} declares no deployments (a `deployments:` list)")
    return [
        spec.model_copy(update={"parameters": {**spec.parameters, "job": _reference_of(spec)}})
        for spec in specs
    ]


def report(
    job: str = typer.Argument(
        ..., help="Job name (e.g. cifar10-mobile) or the reference it was run from."
    ),
    run_id: str = typer.Option("default", "--run-id", help="Run id of the training run."),
    svg: Path | None = typer.Option(
        None, "--svg", help="Also write test accuracy and loss over rounds to this SVG file."
    ),
) -> None:
    """Print a run's rounds (the job's test metrics, devices) and their curves, from S3."""
    job = _job_name(job)
    store = S3ObjectStore(S3Settings())
    commit = read_commit(store, job, run_id)
    if commit is None:
        console.print(f"[red]error:[/red] no committed round for {job} run {run_id!r}")
        raise typer.Exit(1)
    table = render_reports(job, run_id, store, commit)
    console.print(table)
    if svg is not None:
        svg.write_text(table.chart_svg())
        console.print(f"chart: {svg}")


def render_reports(job: str, run_id: str, store: S3ObjectStore, commit: CommitRecord) -> RoundTable:
    """The run's round table, fitted to the terminal it is printed on."""
    reports = read_reports(store, commit)
    dataset = next((r.eval_dataset for r in reports if r.eval_dataset), "n/a")
    return RoundTable(reports, title=f"{job} / {run_id} — evaluated on {dataset}")


def demo(
    job: str = typer.Option(
        "cifar10-mobile",
        help="Deployment to run: a name in prefect.yaml or one `canopy deploy` registered.",
    ),
    root: Path = typer.Option(DEFAULT_ROOT, help="Folder for the stack's logs and pids."),
    keep: bool = typer.Option(False, help="Leave the stack running afterwards."),
    dropout: Dropout = _FLEET.dropout,
    slow_fraction: SlowFraction = _FLEET.slow_fraction,
    offline_fraction: OfflineFraction = _FLEET.offline_fraction,
    prefect_port: PrefectPort = _PORTS.prefect,
    s3_port: S3Port = _PORTS.s3,
    gateway_ports: GatewayPorts = _GATEWAY_PORTS,
    edge_workers: EdgeWorkers = 0,
) -> None:
    """Bring the stack up, run one deployment with --watch, print its rounds, stop the stack."""
    try:
        spec = next((s for s in stack.all_deployment_specs(root) if s.name == job), None)
    except stack.StackError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if spec is None:
        console.print(f"[red]error:[/red] no deployment {job!r} in prefect.yaml or `canopy deploy`")
        raise typer.Exit(2)
    reference = str(spec.parameters["job"])
    job_name = _job_name(reference)
    # As many simulated phones as the deployment partitions its data for.
    devices = int(spec.parameters.get("num_devices", _FLEET.devices))
    fleet = stack.SimulatedFleet(devices, _FLEET.seed, dropout, slow_fraction, offline_fraction)
    ports = _ports(prefect_port, s3_port, gateway_ports)
    record = _start(root, (reference,), ports, fleet, edge_workers)
    run_id = f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    env = {**os.environ, **record.env}
    cmd = [
        str(Path(sys.executable).parent / "prefect"),
        "deployment",
        "run",
        f"federated-training/{job}",
        "-p",
        f"run_id={run_id}",
        "--watch",
    ]
    watch_log = root / "logs" / f"watch-{run_id}.log"
    console.print(f"\n[bold]$ {' '.join(cmd)}[/bold]")
    console.print(f"  Prefect UI: {record.env['CANOPY_PREFECT_UI_URL']}   events: {watch_log}")
    os.environ.update(record.env)
    store = S3ObjectStore(S3Settings())
    rounds = int(spec.parameters.get("rounds", 1))
    try:
        with watch_log.open("wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            follow_rounds(store, job_name, run_id, rounds, proc)
        code = proc.wait()
        commit = read_commit(store, job_name, run_id)
        if commit is not None:
            console.print(render_reports(job_name, run_id, store, commit))
        if code != 0:
            console.print(f"[red]the flow run did not complete; see {watch_log}[/red]")
    finally:
        if not keep:
            stack.down(root, log=lambda _m: None)
    raise typer.Exit(code)


def follow_rounds(
    store: S3ObjectStore, job: str, run_id: str, rounds: int, proc: subprocess.Popen[bytes]
) -> None:
    """A progress bar of committed rounds and one line per round, read from S3 reports."""
    shown = 0
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task(f"{job} rounds", total=rounds)
        while True:
            running = proc.poll() is None
            commit = read_commit(store, job, run_id)
            reports = read_reports(store, commit) if commit is not None else []
            for r in reports[shown:]:
                progress.console.print(
                    f"round {r.round}: {r.outcome}, {r.devices_reported}/{r.devices_selected} "
                    f"devices, {metric_line(r)} on {r.eval_dataset or '-'}, "
                    f"{r.duration_s:.1f}s"
                )
            shown = len(reports)
            progress.update(bar, completed=shown)
            if not running:
                return
            time.sleep(2.0)


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("down")(down)
    app.command("deploy")(deploy)
    app.command("report")(report)
    app.command("demo")(demo)
