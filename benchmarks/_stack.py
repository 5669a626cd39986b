"""Measurement harness for benchmarks/round_speed.py: a real local stack and its observers.

Everything here exists so that the benchmark sees the stack a user runs (``canopy up``)
from the outside, without changing it:

* ``BenchStack`` starts moto, a Prefect server (``infra.prefect_server``, SQLite with
  the same tuning as ``canopy up``, or with ``database="postgres"`` a PostgreSQL
  from ``infra.postgres`` as ``canopy up --database postgres`` starts it), gateways
  and, on request, the runner serving
  prefect.yaml, each as its own process group with its log in one folder. Separate
  processes (not threads of the benchmark) so their memory can be told apart.
* ``Simulator`` runs ``python -m edge.simulator`` for one job with an all-fast fleet.
* ``PssSampler`` sums PSS from ``/proc/PID/smaps_rollup`` over process trees.
* ``PointerWatcher`` polls each job's ActiveRound pointer in S3 and records when each
  (run, round, status) was first seen: the open/close instants no report carries.
* ``HttpLog`` times every Prefect API request this process makes (the in-process
  flow's), by wrapping ``httpx`` send at class level.
* ``PrefectApi`` reads flow runs, task runs, states and event counts back afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def parse_ts(text: str | None) -> float | None:
    return None if text is None else datetime.fromisoformat(text).timestamp()


# ---------------------------------------------------------------- the stack


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class BenchStack:
    """moto, Prefect server, gateways (and later the runner) on free loopback ports.

    The environment (``env``) is what ``flows.stack.stack_env`` gives a ``canopy up``
    process, pointed at these ports; the benchmark process applies it to itself too,
    because the in-process flow reads the same ``CANOPY_*`` settings.
    """

    root: Path
    gateways: int = 2
    database: str = "sqlite"  # or "postgres"
    s3_request_log: bool = False  # one line per S3 request in moto.log (benchmarks/scale.py)
    services: list[Service] = field(default_factory=list)
    _runner_starts: int = 0
    env: dict[str, str] = field(default_factory=dict)
    gateway_urls: list[str] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.env["PREFECT_API_URL"]

    def start(self, log: Callable[[str], None] = print) -> BenchStack:
        from infra.health import wait_http_ok
        from infra.prefect_server import PREFECT_SERVER_TUNING, start_prefect_server
        from infra.process import spawn

        s3_port, api_port = free_port(), free_port()
        gw_ports = [free_port() for _ in range(self.gateways)]
        self.gateway_urls = [f"http://127.0.0.1:{p}" for p in gw_ports]
        self.env = {
            "PREFECT_API_URL": f"http://127.0.0.1:{api_port}/api",
            "CANOPY_PREFECT_API_URL": f"http://127.0.0.1:{api_port}/api",
            "CANOPY_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
            "CANOPY_S3_BUCKET": "canopy",
            "CANOPY_S3_ACCESS_KEY_ID": "testing",
            "CANOPY_S3_SECRET_ACCESS_KEY": "testing",
            "CANOPY_S3_CREATE_BUCKET": "true",
            "CANOPY_GATEWAY_URLS": json.dumps(self.gateway_urls),
            **PREFECT_SERVER_TUNING,
        }
        child_env = {**os.environ, **self.env, "PREFECT_HOME": str(self.root / "client-home")}
        t0 = time.monotonic()
        moto = spawn(
            [sys.executable, "-m", "infra.s3_server", "-H", "127.0.0.1", "-p", str(s3_port)]
            + (["--access-log"] if self.s3_request_log else []),
            self.root / "moto.log",
            child_env,
        )
        self.services.append(Service("moto", moto, self.root / "moto.log"))
        database_url = None
        if self.database == "postgres":
            from infra.postgres import PostgresCluster, start_postgres

            self.root.chmod(0o755)  # as root, PostgreSQL runs as `postgres`: it must get in
            cluster = PostgresCluster(self.root / "postgres", port=free_port())
            pg_log = self.root / "postgres.log"
            self.services.append(Service("postgres", start_postgres(cluster, pg_log), pg_log))
            database_url = cluster.url()
        server = start_prefect_server(
            self.root / "prefect-home",
            api_port,
            self.root / "prefect-server.log",
            ui=False,
            base_env=child_env,
            database_url=database_url,
        )
        self.services.append(Service("prefect-server", server, self.root / "prefect-server.log"))
        for i, port in enumerate(gw_ports):
            cmd = [sys.executable, "-m", "edge.gateway", "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["--log-level", "warning"]
            gw_log = self.root / f"gateway-{i}.log"
            self.services.append(Service(f"gateway-{i}", spawn(cmd, gw_log, child_env), gw_log))
        wait_http_ok(f"{self.env['CANOPY_S3_ENDPOINT_URL']}/moto-api/", moto, timeout=60)
        gateway_services = [s for s in self.services if s.name.startswith("gateway-")]
        for url, gateway in zip(self.gateway_urls, gateway_services, strict=True):
            wait_http_ok(f"{url}/healthz", gateway.proc, timeout=60)
        wait_http_ok(f"{self.api}/health", server, timeout=120)
        log(
            f"stack up in {time.monotonic() - t0:.1f}s: prefect {self.api} on {self.database}, "
            f"s3 {self.env['CANOPY_S3_ENDPOINT_URL']}, gateways {', '.join(self.gateway_urls)}"
        )
        return self

    def child_env(self) -> dict[str, str]:
        return {**os.environ, **self.env, "PREFECT_HOME": str(self.root / "client-home")}

    def start_runner(
        self, deployments: Sequence[str], timeout: float = 180.0, *, cold: bool = False
    ) -> float:
        """``python -m flows.serve`` (what ``canopy up`` runs); seconds until it has
        registered ``deployments`` on the server. ``cold``: runs start in fresh
        interpreters (``--cold-start``) instead of forks of a warm process."""
        from infra.health import wait_until
        from infra.process import spawn

        t0 = time.monotonic()
        starts, self._runner_starts = self._runner_starts, self._runner_starts + 1
        # a log per start: readiness is read from it, and an earlier runner's lines would lie
        log = self.root / ("runner.log" if starts == 0 else f"runner-{starts + 1}.log")
        cmd = [sys.executable, "-m", "flows.serve"] + (["--cold-start"] if cold else [])
        proc = spawn(cmd, log, self.child_env())
        self.services.append(Service("runner", proc, log))
        api = PrefectApi(self.api)

        def ready() -> bool:  # registered, and (flows.serve says) its fork server is warm
            return api.has_deployments(deployments) and "runner ready" in log.read_text()

        wait_until(ready, timeout, f"runner (log: {log})", proc)
        return time.monotonic() - t0

    def stop_runner(self) -> None:
        """Stop the runner (and its flow runs) alone, leaving the rest of the stack up."""
        from infra.process import stop_group

        for service in [s for s in self.services if s.name == "runner"]:
            stop_group(service.proc.pid, timeout_s=15.0)
            self.services.remove(service)

    def pids(self) -> dict[str, int]:
        return {s.name: s.proc.pid for s in self.services if s.proc.poll() is None}

    def stop(self) -> None:
        from infra.postgres import stop_postgres
        from infra.process import stop_group

        for service in reversed(self.services):
            stop = stop_postgres if service.name == "postgres" else stop_group
            stop(service.proc.pid, timeout_s=15.0)
        self.services.clear()


class Simulator:
    """``python -m edge.simulator`` for one job: all fast, never drops out, never offline.

    ``--forever``, as under ``canopy up``: several runs of the same job follow each
    other and the job's pointer says ``done`` between them. One simulator serves every
    run of its job, so its training workers are warm (torch imported, dataset built)
    before the first measured round; ``pause`` (SIGSTOP to its process group) keeps
    its polling off the cores while the plain loop is timed.
    """

    def __init__(
        self,
        stack: BenchStack,
        job: str,
        devices: int,
        *,
        seed: int = 0,
        workers: int = 2,
        max_seconds: float = 900.0,
    ) -> None:
        from edge.simulator.command import simulator_command
        from infra.process import spawn

        self.job, self.devices, self.running = job, devices, True
        cmd = simulator_command(
            job,
            stack.gateway_urls,
            devices=devices,
            seed=seed,
            workers=workers,
            quiet=True,
            forever=True,
            dropout=0,
            slow_fraction=0,
            offline_fraction=0,
            max_seconds=max_seconds,
        )
        self.log = stack.root / f"simulator-{job}.log"
        self.proc = spawn(cmd, self.log, stack.child_env())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pause(self) -> None:
        if self.running and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)
        self.running = False

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
        self.running = self.proc.poll() is None

    def wait_warm(self, timeout: float = 120.0, quiet_cpu: float = 0.3) -> float:
        """Seconds until the simulator's process tree uses under ``quiet_cpu`` of a core
        over a second (workers have imported the training stack, devices enrolled)."""
        t0 = time.monotonic()
        time.sleep(2.0)
        last = tree_cpu_seconds(self.proc.pid)
        while time.monotonic() - t0 < timeout:
            time.sleep(1.0)
            now = tree_cpu_seconds(self.proc.pid)
            if now - last < quiet_cpu:
                break
            last = now
        return time.monotonic() - t0

    def stop(self) -> None:
        from infra.process import stop_group

        with contextlib.suppress(ProcessLookupError):
            self.resume()  # a stopped group cannot act on SIGTERM
        stop_group(self.proc.pid, timeout_s=15.0)
        self.running = False


def tree_cpu_seconds(root: int, *, descendants: bool = True) -> float:
    """User + system CPU seconds of ``root`` and (unless told not to) its descendants."""
    children = _children_map() if descendants else {}
    ticks = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().decode(errors="replace").rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except OSError:
            pass
        todo += children.get(pid, [])
    return total


def cpu_by_root(roots: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named root's process tree; this process alone (its
    children are the services, counted under their own names)."""
    me = os.getpid()
    return {name: tree_cpu_seconds(pid, descendants=pid != me) for name, pid in roots.items()}


# ---------------------------------------------------------------- memory


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        # the command sits in parentheses and may hold spaces; ppid follows it
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _short_cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return "?"
    if "-m" in argv:
        i = argv.index("-m")
        return " ".join(argv[i + 1 : i + 3])
    if any("multiprocessing" in a for a in argv):
        return "mp worker"
    return " ".join(Path(a).name for a in argv[:2])


@dataclass
class PssPeak:
    total_kib: int = 0
    processes: dict[str, int] = field(default_factory=dict)  # label -> PSS at the peak
    maxima: dict[str, int] = field(default_factory=dict)  # label -> its own largest PSS
    samples: int = 0


class PssSampler:
    """Samples PSS of every process under a set of named roots, per benchmark phase.

    ``roots`` is called at each sample (services come and go); each root's whole
    process tree counts (the Prefect server's workers, the simulator's training
    processes, the runner's flow-run subprocess), except for this process, whose
    children are the services, counted under their own names. PSS, not RSS, so
    pages shared between processes (libtorch in two workers) are counted once.
    """

    def __init__(self, roots: Callable[[], Mapping[str, int]], interval: float = 0.5) -> None:
        self.roots = roots
        self.interval = interval
        self.phase = "idle"
        self.peaks: dict[str, PssPeak] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> dict[str, int]:
        children = _children_map()
        out: dict[str, int] = {}
        for name, root in self.roots().items():
            stack = [(root, name)]
            while stack:
                pid, label = stack.pop()
                value = pss_kib(pid)
                if value is not None:
                    out[f"{label} [{pid}]"] = value
                if pid == os.getpid():
                    continue
                for child in children.get(pid, []):
                    stack.append((child, f"{name}/{_short_cmd(child)}"))
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a process vanishing mid-read is normal
                values = self.sample()
                peak = self.peaks.setdefault(self.phase, PssPeak())
                peak.samples += 1
                total = sum(values.values())
                for label, kib in values.items():
                    peak.maxima[label] = max(kib, peak.maxima.get(label, 0))
                if total > peak.total_kib:
                    peak.total_kib, peak.processes = total, values


# ---------------------------------------------------------------- the round pointer


@dataclass(frozen=True)
class PointerEvent:
    job: str
    run_id: str
    round: int
    status: str
    seen_at: float
    opened_at: float


class PointerWatcher:
    """Polls ``devices``' view of each job (its ActiveRound) every ``interval`` seconds.

    A report says how long a round's phases took, not when the round opened for
    devices; this does, to within ``interval`` plus one GET (~5 ms on moto).
    """

    def __init__(self, jobs: Sequence[str], interval: float = 0.05) -> None:
        self.jobs = list(jobs)
        self.interval = interval
        self.events: list[PointerEvent] = []
        self._last: dict[str, tuple[str, int, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pointer-watcher", daemon=True)

    def __enter__(self) -> PointerWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from edge.round_control import read_active
        from infra.settings import S3Settings
        from infra.store import S3ObjectStore

        store = S3ObjectStore(S3Settings())
        while not self._stop.wait(self.interval):
            for job in list(self.jobs):  # the benchmark points it at the job it measures
                try:
                    active = read_active(store, job)
                except Exception:  # not written yet, or moto busy: the next poll
                    continue
                if active is None:
                    continue
                key = (active.run_id, active.round, active.status)
                if self._last.get(job) != key:
                    self._last[job] = key
                    self.events.append(
                        PointerEvent(
                            job,
                            active.run_id,
                            active.round,
                            active.status,
                            time.time(),
                            active.opened_at.timestamp(),
                        )
                    )

    def seen(self, run_id: str, rnd: int, status: str) -> float | None:
        for e in self.events:
            if e.run_id == run_id and e.round == rnd and e.status == status:
                return e.seen_at
        return None

    def wait_for(self, run_id: str, rnd: int, status: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (t := self.seen(run_id, rnd, status)) is not None:
                return t
            time.sleep(self.interval / 2)
        return None


# ---------------------------------------------------------------- Prefect API calls


@dataclass(frozen=True)
class HttpCall:
    at: float
    seconds: float
    method: str
    path: str
    status: int


class HttpLog:
    """Every request this process sends to the Prefect API, with its latency and status.

    Prefect's client subclasses ``httpx.AsyncClient`` and calls ``super().send`` for
    each attempt, so wrapping the base class's ``send`` sees every attempt (a retried
    503 shows up as two calls) without touching Prefect or Canopy.
    """

    def __init__(self, api_url: str) -> None:
        self.base = api_url.rstrip("/")
        self.calls: list[HttpCall] = []
        self._lock = threading.Lock()

    def _record(self, request: httpx.Request, started: float, took: float, status: int) -> None:
        url = str(request.url)
        if not url.startswith(self.base):
            return
        path = _UUID.sub("{id}", url[len(self.base) :].split("?", 1)[0])
        with self._lock:
            self.calls.append(HttpCall(started, took, request.method, path, status))

    def install(self) -> None:
        log = self
        async_send = httpx.AsyncClient.send
        sync_send = httpx.Client.send

        async def timed_async(client: httpx.AsyncClient, request: httpx.Request, **kw: Any) -> Any:
            started, t0, status = time.time(), time.perf_counter(), 0
            try:
                response = await async_send(client, request, **kw)
                status = response.status_code
                return response
            finally:
                log._record(request, started, time.perf_counter() - t0, status)

        def timed_sync(client: httpx.Client, request: httpx.Request, **kw: Any) -> Any:
            started, t0, status = time.time(), time.perf_counter(), 0
            try:
                response = sync_send(client, request, **kw)
                status = response.status_code
                return response
            finally:
                log._record(request, started, time.perf_counter() - t0, status)

        httpx.AsyncClient.send = timed_async  # type: ignore[method-assign,assignment]
        httpx.Client.send = timed_sync  # type: ignore[method-assign,assignment]

    def between(self, start: float, end: float) -> list[HttpCall]:
        with self._lock:
            return [c for c in self.calls if start <= c.at < end]


class PrefectApi:
    """Reads what the server recorded (flow runs, task runs, states, events), afterwards."""

    def __init__(self, api_url: str) -> None:
        self.api = api_url.rstrip("/")

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        resp = httpx.post(f"{self.api}{path}", json=body, timeout=30.0)
        resp.raise_for_status()
        return resp.json()

    def has_deployments(self, names: Sequence[str]) -> bool:
        found = {d["name"] for d in self._post("/deployments/filter", {"limit": 200})}
        return set(names) <= found

    def flow_runs_since(self, since: float) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = self._post(
                "/flow_runs/filter",
                {
                    "flow_runs": {"expected_start_time": {"after_": iso(since - 1.0)}},
                    "sort": "EXPECTED_START_TIME_ASC",
                    "limit": 200,
                    "offset": offset,
                },
            )
            runs += page
            if len(page) < 200:
                return runs
            offset += 200

    def task_runs_of(self, flow_run_ids: Sequence[str]) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = []
        for i in range(0, len(flow_run_ids), 50):
            chunk = list(flow_run_ids[i : i + 50])
            offset = 0
            while True:
                page = self._post(
                    "/task_runs/filter",
                    {
                        "flow_runs": {"id": {"any_": chunk}},
                        "limit": 200,
                        "offset": offset,
                    },
                )
                runs += page
                if len(page) < 200:
                    break
                offset += 200
        return runs

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        resp = httpx.get(f"{self.api}/flow_runs/{flow_run_id}", timeout=30.0)
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def states(self, flow_run_id: str) -> list[dict[str, Any]]:
        resp = httpx.get(
            f"{self.api}/flow_run_states/", params={"flow_run_id": flow_run_id}, timeout=30.0
        )
        resp.raise_for_status()
        states: list[dict[str, Any]] = resp.json()
        return sorted(states, key=lambda s: s["timestamp"])

    def event_counts(self, start: float, end: float) -> dict[str, int]:
        """Events the server stored with ``occurred`` in [start, end), by event name."""
        body = {
            "filter": {"occurred": {"since": iso(start), "until": iso(end)}},
            "time_unit": "day",
            "time_interval": 1.0,
        }
        try:
            rows = self._post("/events/count-by/event", body)
        except httpx.HTTPError:
            return {}
        return {r["value"]: int(r["count"]) for r in rows}
