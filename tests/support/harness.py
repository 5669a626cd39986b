"""Start gateways for tests, benchmarks and local stacks: in a thread or a process.

``GatewayThread`` runs uvicorn in a background thread of the current process
(fast to start, shares the caller's store object). ``GatewayProcess`` runs
``python -m edge.gateway`` as a real subprocess configured through
``CANOPY_S3_*`` / ``CANOPY_GATEWAY_*`` environment variables, so it can be
killed with SIGKILL to prove that acknowledged updates survive.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from aggregation.tensors import TensorDict, encode_tensors
from edge import round_control
from edge.gateway.app import create_app
from edge.gateway.tuning import GatewayTuning
from edge.manifests import ActiveRound, DataHint, LeafTask, RoundStatus, Runtime, WorkKind
from edge.round_control import active_round, leaf_tasks, open_round
from edge.routing import assign_leaves
from infra.health import wait_http_ok
from infra.keys import global_model_key, program_key
from infra.settings import GatewaySettings, S3Settings
from infra.store import ObjectStore
from tests.support.service import Service

_REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def settings_env(settings: BaseSettings) -> dict[str, str]:
    """Environment variables that make a child process rebuild ``settings`` exactly."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    env: dict[str, str] = {}
    for name, value in settings:
        if value is None:
            continue
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
        elif isinstance(value, list | dict):
            text = json.dumps(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[f"{prefix}{name}".upper()] = text
    return env


class GatewayThread(Service):
    """A gateway served by uvicorn in a daemon thread of this process."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: ObjectStore,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        gateway_id: str | None = None,
        tuning: GatewayTuning | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
    ) -> None:
        self.port = port or free_port(host)
        scheme = "https" if certfile else "http"
        self.url = f"{scheme}://{host}:{self.port}"
        self.app = create_app(settings, store, gateway_id=gateway_id, tuning=tuning)
        config = uvicorn.Config(
            self.app,
            host=host,
            port=self.port,
            log_level="warning",
            access_log=False,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            lifespan="on",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="gateway")

    def start(self) -> GatewayThread:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"gateway thread on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)


class GatewayProcess(Service):
    """``python -m edge.gateway`` in a subprocess on a free loopback port."""

    def __init__(
        self,
        s3_settings: S3Settings,
        gateway_settings: GatewaySettings,
        *,
        port: int | None = None,
        gateway_id: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        log_level: str = "warning",
    ) -> None:
        self.port = port or free_port()
        self.url = f"{'https' if certfile else 'http'}://127.0.0.1:{self.port}"
        self._verify: str | bool = certfile or True
        env = {**os.environ, **settings_env(s3_settings), **settings_env(gateway_settings)}
        args = [sys.executable, "-m", "edge.gateway", "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--log-level", log_level]
        if gateway_id:
            args += ["--gateway-id", gateway_id]
        if certfile and keyfile:
            args += ["--certfile", certfile, "--keyfile", keyfile]
        self._args = args
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self.proc = subprocess.Popen(self._args, env=self._env, cwd=_REPO_ROOT)
        try:
            wait_http_ok(
                f"{self.url}/healthz", self.proc, timeout=timeout, poll=0.05, verify=self._verify
            )
        except TimeoutError:
            self.kill()
            raise
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("gateway process not started")
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no flushing; what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: uvicorn drains requests and the gateway writes open batches."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def write_round(
    store: ObjectStore,
    *,
    job: str,
    run_id: str,
    rnd: int,
    leaves: Sequence[str],
    selected: Iterable[str],
    state: TensorDict,
    runtime: Runtime = "pytorch",
    program: bytes | None = None,
    deadline_seconds: float = 120.0,
    hyperparams: dict[str, Any] | None = None,
    data_hint: DataHint | None = None,
    poll_seconds: float = 0.5,
    idle_poll_seconds: float = 1.0,
    max_num_samples: int | None = None,
    kind: WorkKind = "train",
    metrics: Sequence[str] = (),
) -> dict[str, LeafTask]:
    """Open a round as the flow does, without Prefect; return the leaf tasks.

    For tests, benchmarks and experiments: store the global model (and
    program), then ``edge.round_control.open_round`` with the selected devices
    routed by ``leaf_for_device``, exactly the calls the flow's open task makes.
    ``kind="evaluate"`` opens the round's federated evaluation instead (tasks
    naming ``metrics``), of the model the round made: the next round's global model.
    """
    model_round = rnd if kind == "train" else rnd + 1
    global_ref = store.put_bytes(
        global_model_key(job, run_id, model_round), encode_tensors(state), kind="global-model"
    )
    program_ref = (
        store.put_bytes(program_key(job, run_id, rnd), program, kind="executorch-program")
        if program is not None
        else None
    )
    now = datetime.now(UTC)
    tasks = leaf_tasks(
        job=job,
        run_id=run_id,
        rnd=rnd,
        selected_by_leaf=assign_leaves(selected, leaves),
        global_model=global_ref,
        program=program_ref,
        tensor_spec={name: (list(arr.shape), arr.dtype.name) for name, arr in state.items()},
        hyperparams=dict(hyperparams or {}),
        runtime=runtime,
        deadline=now + timedelta(seconds=deadline_seconds),
        data_hint=data_hint,
        max_num_samples=max_num_samples,
        kind=kind,
        metrics=metrics,
    )
    pointer = active_round(
        job=job,
        run_id=run_id,
        rnd=rnd,
        leaves=leaves,
        status="open",
        opened_at=now,
        poll_seconds=poll_seconds,
        idle_poll_seconds=idle_poll_seconds,
        kind=kind,
    )
    open_round(store, tasks, pointer)
    return tasks


def set_round_status(store: ObjectStore, active: ActiveRound, status: RoundStatus = "open") -> None:
    """Write ``active`` with ``status`` as the job's ActiveRound (closing or finishing it)."""
    round_control.set_round_status(store, active, status)


def read_active(store: ObjectStore, job: str) -> ActiveRound:
    active = round_control.read_active(store, job)
    assert active is not None, f"no active round for {job}"
    return active
