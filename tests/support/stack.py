"""The local stack end-to-end tests, fault tests and benchmarks run against, part by part.

Real parts on 127.0.0.1: a moto S3 server (``moto_server``), a Prefect server
(``PrefectServer``, started by ``infra.prefect_server`` exactly as ``canopy up``
starts it), gateways (``tests.support.harness``), the device simulator in its
own process (``start_simulator``) and the ``federated-training`` flow in this
process (``run_flow``). ``LocalStack`` is what the ``local_stack`` fixture of
tests/conftest.py hands a test: the test's bucket behind two gateway threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from edge.simulator.command import simulator_command
from infra.edge_workers import (
    register_command,
    worker_command,
    worker_env,
    worker_name,
    workers_online,
)
from infra.health import wait_http_ok, wait_until
from infra.prefect_server import start_prefect_server
from infra.process import spawn, stop_group
from infra.run_state import RoundReport
from infra.settings import S3Settings
from infra.store import S3ObjectStore
from tests.support.harness import free_port
from tests.support.service import Service

REPO = Path(__file__).resolve().parents[2]
# Gateways re-read a round's manifests this often: tests flip round status and
# expect devices to see it within a poll or two.
MANIFEST_CACHE_S = "0.2"


def bench_env(s3_url: str) -> dict[str, str]:
    """What a benchmark process exports to reach its own moto server (bucket ``bench``,
    created on first use) with the tests' short manifest cache."""
    return {
        "CANOPY_S3_ENDPOINT_URL": s3_url,
        "CANOPY_S3_BUCKET": "bench",
        "CANOPY_S3_ACCESS_KEY_ID": "bench",
        "CANOPY_S3_SECRET_ACCESS_KEY": "bench",
        "CANOPY_S3_CREATE_BUCKET": "true",
        "CANOPY_GATEWAY_MANIFEST_CACHE_SECONDS": MANIFEST_CACHE_S,
    }


# A fleet that never drops out, is never offline and has no slow phones.
ALWAYS_ON: dict[str, float] = {"dropout": 0.0, "slow_fraction": 0.0, "offline_fraction": 0.0}

# What the small runs of the tests share; each test states what it changes.
SMALL_RUN: dict[str, Any] = {
    "runtime": "pytorch",
    "rounds": 3,
    "tree": {"depth": 1, "width": 2},
    "round_deadline_s": 60,
    "registry_wait_s": 30,
}


def small_run(**params: Any) -> dict[str, Any]:
    """``SMALL_RUN`` with ``params`` over it: the parameters of ``run_flow``."""
    return {**SMALL_RUN, **params}


class StackError(AssertionError):
    """A stack part did not do what the test waited for (it never hangs instead)."""


def fail(message: str) -> NoReturn:
    raise StackError(message)


def wait_for(check: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll ``check`` until true; fail the test (never hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)


def fresh_bucket(endpoint: str, prefix: str = "test") -> S3Settings:
    """Settings of a bucket of its own on ``endpoint`` (created on first use): how
    tests that share one moto server keep apart."""
    return S3Settings(
        endpoint_url=endpoint,
        bucket=f"{prefix}-{uuid.uuid4().hex[:12]}",
        access_key_id="testing",
        secret_access_key="testing",  # type: ignore[arg-type]
        create_bucket=True,
    )


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in a thread of this process on a free port, kept-alive HTTP/1.1
    as ``canopy up`` serves it (``infra.s3_server``); yields its URL."""
    from infra.s3_server import S3ServerThread

    port = free_port()
    server = S3ServerThread("127.0.0.1", port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


class PrefectServer(Service):
    """A Prefect server (SQLite, tuned like ``canopy up``, no UI) with its own home.

    On a free port unless told one; ``stop`` and ``start`` again restart it in
    place (same port, same database). ``url`` is its API URL.
    """

    def __init__(
        self, home: Path, port: int | None = None, database_url: str | None = None
    ) -> None:
        self.home = home
        self.database_url = database_url  # None: SQLite in ``home``
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 120.0) -> PrefectServer:
        self.starts += 1
        log = self.home / f"server-{self.starts}.log"
        self.proc = start_prefect_server(
            self.home, self.port, log, ui=False, database_url=self.database_url
        )
        wait_http_ok(f"{self.url}/health", self.proc, timeout=timeout, what="prefect server")
        return self

    def stop(self) -> None:
        """SIGTERM to its process group (SIGKILL after 20 s), as ``canopy down`` does."""
        if self.proc is not None:
            stop_group(self.proc.pid, timeout_s=20)
            self.proc = None


@dataclass
class Simulator:
    """The device simulator process, its log and its summary file."""

    proc: subprocess.Popen[bytes]
    summary_path: Path
    log: Path

    def finish(self, timeout: float = 90.0) -> dict[str, Any]:
        """Wait for it to stop by itself (job done, or --max-seconds) and read its summary."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            fail(f"simulator still running after {timeout:g}s: {self.tail()}")
        assert self.proc.returncode == 0, self.tail()
        return dict(json.loads(self.summary_path.read_text()))

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """SIGTERM (a clean stop with a summary), for simulators told to keep polling."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.finish(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def start_simulator(
    job: str,
    devices: int,
    gateways: list[str],
    folder: Path,
    *,
    name: str,
    env: Mapping[str, str] | None = None,
    **options: Any,
) -> Simulator:
    """``python -m edge.simulator`` (quiet) with its log and summary JSON in ``folder``.

    ``options`` are the simulator's (``seed=3``, ``max_seconds=240``, ``runtime=...``);
    ``name`` tells its files apart from other simulators' in the same folder.
    """
    summary, log = folder / f"sim-{name}.json", folder / f"sim-{name}.log"
    command = simulator_command(
        job, gateways, devices=devices, quiet=True, summary_json=summary, **options
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Simulator(proc, summary, log)


def run_flow(**params: Any) -> list[RoundReport]:
    """The ``federated-training`` flow in this process, against PREFECT_API_URL."""
    from flows.federated import federated_training

    return asyncio.run(federated_training(**params))


@dataclass
class LocalStack:
    """The test's bucket (``store``) behind two gateway threads (``gateways``, their URLs).

    The session's Prefect server and moto are the ``prefect_api`` and
    ``moto_endpoint`` fixtures; ``CANOPY_*`` in this process point at them, so
    ``run_flow`` runs the flow against this stack.
    """

    s3: S3Settings
    store: S3ObjectStore
    gateways: list[str]
    tmp: Path
    _simulators: list[Simulator] = field(default_factory=list)

    def simulate(
        self, job: str, devices: int, *, seed: int = 0, max_seconds: float = 240, **options: Any
    ) -> Simulator:
        """Start the device simulator for ``job`` (it stops when the job is done)."""
        sim = start_simulator(
            job,
            devices,
            self.gateways,
            self.tmp,
            name=str(len(self._simulators)),
            seed=seed,
            max_seconds=max_seconds,
            **options,
        )
        self._simulators.append(sim)
        return sim

    def close(self) -> None:
        """Kill what a failed test left running."""
        for sim in self._simulators:
            sim.kill()


@contextlib.contextmanager
def edge_workers(
    api_url: str, s3: S3Settings, count: int, folder: Path, *, timeout: float = 90.0
) -> Iterator[list[str]]:
    """``count`` process workers of the ``edge`` work pool, as ``canopy up --edge-workers``
    starts them; the pool and the ``edge-leaf`` deployment are (re-)applied first, by
    the same command (``infra.edge_workers.register_command``).

    Workers take S3's endpoint and credentials from ``s3`` (each leaf run reads the
    bucket from its task's reference, so one set of workers serves every test's
    bucket). Yields their names; stops them with SIGTERM to their process groups.
    """
    from tests.support.harness import settings_env

    env = worker_env({**os.environ, **settings_env(s3)}, api_url)
    subprocess.run(register_command(), env=env, cwd=REPO, check=True, timeout=120)
    names = [worker_name(i) for i in range(count)]
    procs = [spawn(worker_command(n), folder / f"{n}.log", env) for n in names]
    try:
        wait_until(workers_online(api_url, names), timeout, "edge workers", procs[0])
        yield names
    finally:
        for proc in procs:
            stop_group(proc.pid, timeout_s=20)
