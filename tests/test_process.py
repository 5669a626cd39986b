"""Services as process groups, and the one way a Prefect server is started."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from infra.prefect_server import (
    PREFECT_SERVER_TUNING,
    prefect_server_command,
    prefect_server_env,
)
from infra.process import alive, spawn, stop_group


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """True once ``pid`` has exited (a zombie nobody has reaped yet counts as gone)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_spawn_leads_a_group_logs_output_and_stop_group_stops_its_children(
    tmp_path: Path,
) -> None:
    # Prepare: a service that starts a child of its own, then prints both pids
    log = tmp_path / "logs" / "svc.log"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = spawn([sys.executable, "-c", script], log, dict(os.environ))
    deadline = time.monotonic() + 20
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(log.read_text().split()[0])

    # Assert: the service leads its own process group, and its child is in it
    assert os.getpgid(proc.pid) == proc.pid
    assert os.getpgid(child) == proc.pid

    # Execute
    assert stop_group(proc.pid, timeout_s=10.0) is True

    # Assert: both are gone, and a second stop finds nothing to do
    assert not alive(proc.pid)
    assert _gone(child)
    assert stop_group(proc.pid) is False


def test_stop_group_kills_a_service_that_ignores_sigterm(tmp_path: Path) -> None:
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "stubborn.log"
    proc = spawn([sys.executable, "-c", script], log, dict(os.environ))
    deadline = time.monotonic() + 20
    while "ready" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)

    started = time.monotonic()
    assert stop_group(proc.pid, timeout_s=0.5) is True

    assert not alive(proc.pid)
    assert time.monotonic() - started < 5.0


def test_prefect_server_env_is_the_tuned_server_with_its_own_home(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin", "PREFECT_API_URL": "http://elsewhere:4200/api"}

    env = prefect_server_env(tmp_path, ui=False, base=base)

    assert env["PREFECT_HOME"] == str(tmp_path)
    assert "PREFECT_API_URL" not in env  # a client setting; the server must not inherit it
    assert env["PREFECT_UI_ENABLED"] == "false"
    assert env["PATH"] == "/usr/bin"
    assert {k: env[k] for k in PREFECT_SERVER_TUNING} == PREFECT_SERVER_TUNING
    assert "PREFECT_UI_ENABLED" not in prefect_server_env(tmp_path, base=base)


def test_prefect_server_ui_calls_the_api_on_the_servers_own_port(tmp_path: Path) -> None:
    # `prefect server start --port` does not tell its UI the port: it would call 4200.
    env = prefect_server_env(tmp_path, base={}, api_url="http://127.0.0.1:4300/api")

    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4300/api"
    assert "PREFECT_UI_API_URL" not in prefect_server_env(tmp_path, ui=False, base={}, api_url="x")


def test_prefect_server_command_is_this_interpreters_prefect_app() -> None:
    assert prefect_server_command("127.0.0.1", 4321) == [
        sys.executable,
        "-m",
        "infra.prefect_app",
        "--host",
        "127.0.0.1",
        "--port",
        "4321",
    ]
