"""The one-command local stack: Prefect server, moto S3, gateways, runner, simulators.

``canopy up`` starts each service as its own process group on 127.0.0.1, waits
until each answers its health check, and records pids, ports and log paths in
one folder (``.canopy/stack`` by default). ``canopy down`` reads that record and
stops exactly those process groups with SIGTERM (a process started in the
background ignores SIGINT), then SIGKILL for any that linger.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from flows.deployments import load_deployment_specs
from infra.errors import CanopyError

# Prefect's SQLite server records task events one transaction each; batching them
# and flushing every second removes the 'database is locked' 503s (and the
# client's fixed 2 s back-off) that otherwise dominate a round's overhead.
PREFECT_SERVER_TUNING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "1000",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "1000",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}

DEFAULT_JOBS = ("hello-mobile", "xor-mobile", "cifar10-mobile")


class StackError(CanopyError):
    """A service of the local stack failed to start or stop."""


@dataclass(frozen=True)
class StackPorts:
    prefect: int = 4200
    s3: int = 4566
    gateways: tuple[int, ...] = (8081, 8082)


@dataclass
class ServiceRecord:
    name: str
    pid: int
    command: list[str]
    log: str
    url: str | None = None


@dataclass
class StackRecord:
    root: str
    env: dict[str, str]
    services: list[ServiceRecord] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> StackRecord:
        raw = json.loads(path.read_text())
        return cls(
            root=raw["root"],
            env=raw["env"],
            services=[ServiceRecord(**s) for s in raw["services"]],
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start(
    name: str, command: list[str], root: Path, env: Mapping[str, str], url: str | None = None
) -> ServiceRecord:
    log = root / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            start_new_session=True,  # own process group: `down` stops its children too
        )
    return ServiceRecord(name=name, pid=proc.pid, command=command, log=str(log), url=url)


def _wait(
    service: ServiceRecord, ready: Callable[[], bool], timeout_s: float, poll_s: float = 0.25
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(service.pid):
            raise StackError(f"{service.name} exited during start-up; see {service.log}")
        try:
            if ready():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(poll_s)
    raise StackError(f"{service.name} not healthy after {timeout_s:.0f}s; see {service.log}")


def _http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        return httpx.get(url, timeout=2.0).status_code < 500

    return check


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


def start_prefect_server(
    home: Path, port: int, log: Path, *, ui: bool = True
) -> subprocess.Popen[bytes]:
    """A Prefect server on 127.0.0.1 with its own PREFECT_HOME and the SQLite tuning.

    Shared by ``canopy up``-style tooling, the test suite and the benchmarks, so
    all of them measure and test the same server configuration.
    """
    env = {**os.environ, **PREFECT_SERVER_TUNING, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    if not ui:
        env["PREFECT_UI_ENABLED"] = "false"
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"process {proc.pid} exited before {url} was healthy")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise StackError(f"{url} not healthy after {timeout_s:.0f}s")


def deployment_names() -> list[str]:
    """Deployment names declared in prefect.yaml (the one source of truth)."""
    return [spec.name for spec in load_deployment_specs()]


def up(
    root: Path,
    *,
    ports: StackPorts = StackPorts(),
    jobs: tuple[str, ...] = DEFAULT_JOBS,
    devices: int = 40,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> StackRecord:
    """Start the stack (refusing if one recorded in ``root`` is still running)."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    path = record_path(root)
    if path.exists():
        old = StackRecord.load(path)
        if any(_alive(s.pid) for s in old.services):
            raise StackError(f"a stack is already running from {root}; run `canopy down` first")
    env = stack_env(root, ports)
    record = StackRecord(root=str(root), env=env)
    py = sys.executable
    bindir = Path(py).parent
    host = "127.0.0.1"

    def launch(
        name: str,
        cmd: list[str],
        ready: Callable[[], bool] | None,
        url: str | None,
        timeout_s: float = 60.0,
    ) -> None:
        service = _start(name, cmd, root, env, url)
        record.services.append(service)
        record.save(path)  # saved after each start, so `down` can clean a half-started stack
        if ready is not None:
            _wait(service, ready, timeout_s)
        log(f"  {name:<22} pid {service.pid:<7} {url or ''}")

    try:
        s3_url = env["CANOPY_S3_ENDPOINT_URL"]
        launch(
            "moto-s3",
            [py, "-m", "moto.server", "-H", host, "-p", str(ports.s3)],
            _http_ok(f"{s3_url}/moto-api/"),
            s3_url,
        )
        api = env["PREFECT_API_URL"]
        launch(
            "prefect-server",
            [
                str(bindir / "prefect"),
                "server",
                "start",
                "--host",
                host,
                "--port",
                str(ports.prefect),
            ],
            _http_ok(f"{api}/health"),
            env["CANOPY_PREFECT_UI_URL"],
            timeout_s=120.0,
        )
        gateway_urls = json.loads(env["CANOPY_GATEWAY_URLS"])
        for i, (port, url) in enumerate(zip(ports.gateways, gateway_urls, strict=True)):
            launch(
                f"gateway-{i}",
                [py, "-m", "edge.gateway", "--host", host, "--port", str(port)],
                _http_ok(f"{url}/healthz"),
                url,
            )
        launch(
            "runner",
            [py, "-m", "flows.serve"],
            _deployments_ready(api, deployment_names(), datetime.now(UTC)),
            None,
            timeout_s=120.0,
        )
        for job in jobs:
            launch(
                f"simulator-{job}",
                [
                    str(bindir / "canopy"),
                    "simulate",
                    "--job",
                    job,
                    "--devices",
                    str(devices),
                    "--seed",
                    str(seed),
                    "--gateway",
                    ",".join(gateway_urls),
                    "--forever",
                ],
                None,
                None,
            )
    except BaseException:
        down(root, log=lambda _msg: None)
        raise
    return record


def down(root: Path, *, timeout_s: float = 15.0, log: Callable[[str], None] = print) -> int:
    """Stop what ``up`` started from ``root``, newest first; returns how many were stopped."""
    path = record_path(root.resolve())
    if not path.exists():
        log(f"no stack recorded in {root}")
        return 0
    record = StackRecord.load(path)
    stopped = 0
    for service in reversed(record.services):
        if not _alive(service.pid):
            continue
        try:
            os.killpg(service.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout_s
        while _alive(service.pid) and time.monotonic() < deadline:
            _reap(service.pid)
            time.sleep(0.1)
        if _alive(service.pid):
            os.killpg(service.pid, signal.SIGKILL)
            _reap(service.pid)
        stopped += 1
        log(f"  stopped {service.name} (pid {service.pid})")
    path.unlink()
    return stopped


def _reap(pid: int) -> None:
    """Collect a child we started ourselves, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
