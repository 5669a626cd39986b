"""The one-command local stack: Prefect server, moto S3, gateways, runner, simulators.

``canopy up`` starts each service as its own process group on 127.0.0.1, waits
until each answers its health check, and records pids, ports and log paths in
one folder (``.canopy/stack`` by default). Prefect's database is SQLite in that
folder, or with ``--database postgres`` a PostgreSQL the stack starts and owns
(``infra.postgres``; its cluster stays in ``<folder>/postgres`` between stacks).
``canopy down`` reads that record and stops exactly those process groups with
SIGTERM (a process started in the background ignores SIGINT), then SIGKILL for
any that linger; PostgreSQL gets a fast shutdown (SIGINT) first.

Jobs are given as references (a built-in name, ``module:ATTR`` or
``path/to/file.py:ATTR``) and checked before anything starts; each gets a
simulator named after the job's declared name. ``canopy deploy`` adds a
deployment for a user's job to the stack's ``deployments.yaml``, which the
stack's runner serves (see ``flows.serve``).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from edge.jobs import get_job
from edge.jobs.spec import JobSpec
from edge.simulator.command import simulator_command as edge_simulator_command
from edge.simulator.fleet import SimulationConfig
from flows.deployments import (
    DeploymentSpec,
    canonical_reference,
    load_deployment_specs,
    load_user_deployments,
    record_user_deployments,
    user_deployments_path,
)
from infra.edge_workers import (
    EDGE_POOL,
    register_command,
    worker_command,
    worker_env,
    worker_name,
    workers_online,
)
from infra.errors import CanopyError, ConfigError
from infra.health import NotHealthyError, Process, wait_http_ok, wait_until
from infra.postgres import (
    PostgresCluster,
    PostgresError,
    check_startable,
    spawn_postgres,
    stop_postgres,
    wait_ready,
)
from infra.prefect_server import (
    PREFECT_SERVER_TUNING,
    prefect_server_command,
    start_prefect_server,
)
from infra.process import alive, spawn, stop_group

DEFAULT_JOBS = ("hello-mobile", "xor-mobile", "cifar10-mobile")
POSTGRES = "postgres"  # the service name of Prefect's PostgreSQL, stopped by a fast shutdown


class StackError(CanopyError):
    """A service of the local stack failed to start or stop."""


@dataclass(frozen=True)
class StackPorts:
    """Where each service listens on 127.0.0.1; settable so a stack runs beside other servers."""

    prefect: int = 4200
    s3: int = 4566
    gateways: tuple[int, ...] = (8081, 8082)
    postgres: int | None = None  # PostgreSQL's port for Prefect's database; None: SQLite

    def named(self) -> list[tuple[str, int]]:
        return [
            *([(POSTGRES, self.postgres)] if self.postgres is not None else []),
            ("prefect-server", self.prefect),
            ("moto-s3", self.s3),
            *((f"gateway-{i}", p) for i, p in enumerate(self.gateways)),
        ]


@dataclass(frozen=True)
class SimulatedFleet:
    """The phones ``canopy up`` simulates for each job.

    The defaults are the simulator's own (a few slow, offline and dropping-out
    devices, as real fleets have); zero fractions give a fleet that never drops
    out, is never offline and has no slow phones.
    """

    devices: int = 40
    seed: int = 0
    dropout: float = SimulationConfig.dropout
    slow_fraction: float = SimulationConfig.slow_fraction
    offline_fraction: float = SimulationConfig.offline_fraction


@dataclass
class ServiceRecord:
    name: str
    pid: int
    command: list[str]
    log: str
    url: str | None = None


@dataclass(frozen=True)
class SimulatedJob:
    """A job the stack simulates phones for: what the user named and what it declares."""

    reference: str  # built-in name, module:ATTR, or an absolute /path/file.py:ATTR
    name: str  # the spec's name: what devices enrol under, and the simulator's service name


@dataclass
class StackRecord:
    root: str
    env: dict[str, str]
    services: list[ServiceRecord] = field(default_factory=list)
    jobs: list[SimulatedJob] = field(default_factory=list)
    devices: int | None = None  # simulated phones per job (``canopy deploy``'s default)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> StackRecord:
        raw = json.loads(path.read_text())
        return cls(
            root=raw["root"],
            env=raw["env"],
            services=[ServiceRecord(**s) for s in raw["services"]],
            jobs=[SimulatedJob(**j) for j in raw.get("jobs", [])],
            devices=raw.get("devices"),
        )


def stack_env(root: Path, ports: StackPorts) -> dict[str, str]:
    """Environment every stack process shares: where S3, Prefect and the gateways are."""
    host = "127.0.0.1"
    return {
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_URL": f"http://{host}:{ports.prefect}/api",
        "CANOPY_PREFECT_API_URL": f"http://{host}:{ports.prefect}/api",
        "CANOPY_PREFECT_UI_URL": f"http://{host}:{ports.prefect}",
        "CANOPY_S3_ENDPOINT_URL": f"http://{host}:{ports.s3}",
        "CANOPY_S3_BUCKET": "canopy",
        "CANOPY_S3_ACCESS_KEY_ID": "testing",
        "CANOPY_S3_SECRET_ACCESS_KEY": "testing",
        "CANOPY_S3_CREATE_BUCKET": "true",
        "CANOPY_GATEWAY_URLS": json.dumps([f"http://{host}:{p}" for p in ports.gateways]),
        **PREFECT_SERVER_TUNING,
    }


def record_path(root: Path) -> Path:
    return root / "stack.json"


def resolve_job(reference: str) -> tuple[str, JobSpec]:
    """(canonical reference, spec) of a job reference; a bad one is a ``StackError``
    naming the job and the fix, raised before any service starts."""
    canonical = canonical_reference(reference)
    try:
        return canonical, get_job(canonical)
    except ConfigError as exc:
        raise StackError(str(exc)) from exc


def simulated_jobs(references: tuple[str, ...]) -> list[SimulatedJob]:
    """The jobs to simulate, resolved; two references declaring one name are refused."""
    jobs: dict[str, SimulatedJob] = {}
    for reference in references:
        canonical, spec = resolve_job(reference)
        if spec.name in jobs and jobs[spec.name].reference != canonical:
            raise StackError(
                f"jobs {jobs[spec.name].reference!r} and {reference!r} both declare the name "
                f"{spec.name!r}; devices enrol by name, so simulate only one of them"
            )
        jobs[spec.name] = SimulatedJob(reference=canonical, name=spec.name)
    return list(jobs.values())


def _deployments_ready(api_url: str, names: list[str], since: datetime) -> Callable[[], bool]:
    """True once the runner has (re)registered every deployment after ``since``.

    Prefect's database outlives a stack, so a deployment merely existing may
    still carry last session's parameters; only a fresh ``updated`` proves the
    runner has applied prefect.yaml as it is now.
    """

    def check() -> bool:
        resp = httpx.post(f"{api_url}/deployments/filter", json={"limit": 200}, timeout=5.0)
        if resp.status_code != 200:
            return False
        fresh = {d["name"] for d in resp.json() if datetime.fromisoformat(d["updated"]) >= since}
        return set(names) <= fresh

    return check


def check_ports(ports: StackPorts, host: str = "127.0.0.1") -> None:
    """Refuse to start when a port is taken or given twice, naming the service and its option.

    Without this a busy port shows up as a service that "exited during start-up",
    after the services before it were started and stopped again.
    """
    seen: dict[int, str] = {}
    for name, port in ports.named():
        if port in seen:
            raise StackError(f"{name} and {seen[port]} are both given port {port}")
        seen[port] = name
        with socket.socket() as sock:
            # SO_REUSEADDR: a port in TIME_WAIT is free for a server, only a listener blocks it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise StackError(
                    f"port {port} for {name} is already in use on {host}; "
                    "pick free ones with --prefect-port, --s3-port, --gateway-ports "
                    "or --postgres-port"
                ) from exc


def deployment_names(root: Path | None = None) -> list[str]:
    """Deployment names declared in prefect.yaml, and with ``root`` the stack's user ones."""
    names = [spec.name for spec in load_deployment_specs()]
    if root is not None:
        names += [spec.name for spec in user_deployments(root)]
    return names


def user_deployments(root: Path) -> list[DeploymentSpec]:
    """The deployments ``canopy deploy`` recorded for the stack in ``root``."""
    try:
        return load_user_deployments(user_deployments_path(root.resolve()))
    except (ConfigError, ValueError) as exc:  # ValueError: YAML and pydantic errors
        raise StackError(
            f"{user_deployments_path(root)}: {exc}; fix or delete the file "
            "(it holds what `canopy deploy` registered)"
        ) from exc


def all_deployment_specs(root: Path) -> list[DeploymentSpec]:
    """prefect.yaml's deployments, then the stack's user deployments."""
    return [*load_deployment_specs(), *user_deployments(root)]


def up(
    root: Path,
    *,
    ports: StackPorts = StackPorts(),
    jobs: tuple[str, ...] = DEFAULT_JOBS,
    fleet: SimulatedFleet = SimulatedFleet(),
    edge_workers: int = 0,
    log: Callable[[str], None] = print,
) -> StackRecord:
    """Start the stack (refusing if one recorded in ``root`` is still running).

    With ``edge_workers`` N > 0 it also creates the ``edge`` work pool and its
    ``edge-leaf`` deployment and starts N process workers of it, and the runner
    runs every deployment's leaves on that pool (``leaf_mode: edge-pool``).
    """
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    path = record_path(root)
    if path.exists():
        old = StackRecord.load(path)
        if any(alive(s.pid) for s in old.services):
            raise StackError(f"a stack is already running from {root}; run `canopy down` first")
    if importlib.util.find_spec("moto") is None:
        raise StackError(
            "the local stack's S3 server (moto) is not installed; install the 'local' extra: "
            "pip install -e '.[local]'"
        )
    check_ports(ports)
    if ports.postgres is not None:
        try:
            check_startable(PostgresCluster(root / POSTGRES, port=ports.postgres))
        except PostgresError as exc:
            raise StackError(str(exc)) from exc
    simulated = simulated_jobs(jobs)  # a bad job reference fails before anything starts
    names = deployment_names(root)  # and so does a broken deployments.yaml
    env = stack_env(root, ports)
    if edge_workers > 0:  # the runner serves every deployment with its leaves on the pool
        env["CANOPY_EDGE_LEAF_MODE"] = "edge-pool"
    child_env = {**os.environ, **env}
    record = StackRecord(root=str(root), env=env, jobs=simulated, devices=fleet.devices)
    py = sys.executable
    host = "127.0.0.1"

    def log_file(name: str) -> Path:
        return root / "logs" / f"{name}.log"

    def started(name: str, pid: int, cmd: list[str], url: str | None) -> str:
        """Record a service before waiting on it, so `down` can clean a half-started stack."""
        record.services.append(ServiceRecord(name, pid, cmd, str(log_file(name)), url))
        record.save(path)
        log(f"  {name:<22} pid {pid:<7} {url or ''}")
        return f"{name} (log: {log_file(name)})"

    def launch(name: str, cmd: list[str], url: str | None) -> tuple[Process, str]:
        proc = spawn(cmd, log_file(name), child_env)
        return proc, started(name, proc.pid, cmd, url)

    try:
        s3_url = env["CANOPY_S3_ENDPOINT_URL"]
        proc, what = launch(
            "moto-s3", [py, "-m", "infra.s3_server", "-H", host, "-p", str(ports.s3)], s3_url
        )
        wait_http_ok(f"{s3_url}/moto-api/", proc, timeout=60.0, what=what)

        database_url = None
        if ports.postgres is not None:
            cluster = PostgresCluster(root / POSTGRES, port=ports.postgres, host=host)
            try:
                proc = spawn_postgres(cluster, log_file(POSTGRES))
            except PostgresError as exc:
                raise StackError(str(exc)) from exc
            pg_url = f"postgresql://{host}:{ports.postgres}/prefect"
            what = started(POSTGRES, proc.pid, [str(a) for a in proc.args], pg_url)
            wait_ready(cluster, proc, timeout=60.0, what=what)
            database_url = cluster.url()

        api = env["PREFECT_API_URL"]
        server = start_prefect_server(
            root / "prefect",
            ports.prefect,
            log_file("prefect-server"),
            base_env=child_env,
            database_url=database_url,
        )
        what = started(
            "prefect-server",
            server.pid,
            prefect_server_command(host, ports.prefect),
            env["CANOPY_PREFECT_UI_URL"],
        )
        wait_http_ok(f"{api}/health", server, timeout=120.0, what=what)

        gateway_urls = json.loads(env["CANOPY_GATEWAY_URLS"])
        for i, (port, url) in enumerate(zip(ports.gateways, gateway_urls, strict=True)):
            cmd = [py, "-m", "edge.gateway", "--host", host, "--port", str(port)]
            proc, what = launch(f"gateway-{i}", cmd, url)
            wait_http_ok(f"{url}/healthz", proc, timeout=60.0, what=what)

        if edge_workers > 0:
            _start_edge_workers(edge_workers, env, child_env, log_file, started)

        since = datetime.now(UTC)
        serve = [py, "-m", "flows.serve", "--user-deployments", str(user_deployments_path(root))]
        proc, what = launch("runner", serve, None)
        wait_until(_deployments_ready(api, names, since), 120.0, what, proc)

        for job in simulated:
            command = simulator_command(job.reference, gateway_urls, fleet)
            launch(f"simulator-{job.name}", command, None)
    except NotHealthyError as exc:
        down(root, log=lambda _msg: None)
        raise StackError(str(exc)) from exc
    except BaseException:
        down(root, log=lambda _msg: None)
        raise
    return record


def _start_edge_workers(
    count: int,
    env: dict[str, str],
    child_env: dict[str, str],
    log_file: Callable[[str], Path],
    started: Callable[[str, int, list[str], str | None], str],
) -> None:
    """The ``edge`` pool and its deployment (one short process), then ``count`` workers,
    waited for until each has sent the API its first heartbeat."""
    api = env["PREFECT_API_URL"]
    register = register_command(EDGE_POOL)
    done = subprocess.run(register, env=child_env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise StackError(f"registering the edge-leaf deployment failed: {done.stderr[-2000:]}")
    names = [worker_name(i) for i in range(count)]
    procs = []
    for name in names:
        cmd = worker_command(name)
        proc = spawn(cmd, log_file(name), worker_env(child_env, api))
        procs.append((proc, started(name, proc.pid, cmd, None)))
    for (proc, what), name in zip(procs, names, strict=True):
        wait_until(workers_online(api, [name]), 90.0, what, proc)


def simulator_command(job: str, gateway_urls: list[str], fleet: SimulatedFleet) -> list[str]:
    """``canopy simulate`` for one job reference, polling forever (a local stack outlives
    runs)."""
    return edge_simulator_command(
        job,
        gateway_urls,
        devices=fleet.devices,
        seed=fleet.seed,
        dropout=fleet.dropout,
        slow_fraction=fleet.slow_fraction,
        offline_fraction=fleet.offline_fraction,
        forever=True,
    )


def down(root: Path, *, timeout_s: float = 15.0, log: Callable[[str], None] = print) -> int:
    """Stop what ``up`` started from ``root``, newest first; returns how many were stopped."""
    path = record_path(root.resolve())
    if not path.exists():
        log(f"no stack recorded in {root}")
        return 0
    record = StackRecord.load(path)
    stopped = 0
    for service in reversed(record.services):
        stop = stop_postgres if service.name == POSTGRES else stop_group
        if stop(service.pid, timeout_s):
            stopped += 1
            log(f"  stopped {service.name} (pid {service.pid})")
    path.unlink()
    return stopped


def running_record(root: Path) -> StackRecord | None:
    """The record of the stack running from ``root``, or None when none is."""
    path = record_path(root.resolve())
    if not path.exists():
        return None
    record = StackRecord.load(path)
    return record if any(alive(s.pid) for s in record.services) else None


def deploy(
    root: Path,
    specs: list[DeploymentSpec],
    *,
    timeout_s: float = 60.0,
    log: Callable[[str], None] = print,
) -> bool:
    """Record ``specs`` as the stack's user deployments; if the stack runs, wait until
    its runner serves them. Returns whether they are served now (False: no stack
    runs, and the next ``canopy up`` will serve them)."""
    root = root.resolve()
    since = datetime.now(UTC)
    try:
        record_user_deployments(user_deployments_path(root), specs)
    except ConfigError as exc:
        raise StackError(str(exc)) from exc
    record = running_record(root)
    if record is None:
        log(f"recorded in {user_deployments_path(root)}; `canopy up` will serve it")
        return False
    runner = next((s for s in record.services if s.name == "runner"), None)
    if runner is None or not alive(runner.pid):
        raise StackError(f"the stack in {root} has no running runner; run `canopy down`, `up`")
    names = [spec.name for spec in specs]
    try:
        wait_until(
            _deployments_ready(record.env["PREFECT_API_URL"], names, since),
            timeout_s,
            f"runner (log: {runner.log})",
            None,
        )
    except NotHealthyError as exc:
        raise StackError(f"the runner did not serve {names} in {timeout_s:.0f}s: {exc}") from exc
    return True
