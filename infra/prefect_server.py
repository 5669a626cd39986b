"""The one way Canopy starts a Prefect server: ``canopy up``, the tests and the benchmarks.

All of them start the same command with the same tuning, so what the
benchmarks measure and the tests exercise is the server a user runs. Its
database is SQLite in its home unless given a ``database_url``
(``infra.postgres`` makes one for a PostgreSQL it starts).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from infra.process import spawn

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

# The server's own database settings (Prefect reads both spellings). One inherited
# from a developer's shell would silently move the server's database elsewhere.
DATABASE_ENV = tuple(
    f"PREFECT_{scope}_DATABASE_{name}"
    for scope in ("API", "SERVER")
    for name in ("CONNECTION_URL", "DRIVER", "HOST", "PORT", "USER", "NAME", "PASSWORD")
)


def prefect_server_command(host: str, port: int) -> list[str]:
    """Prefect's server app in this interpreter, with lock races retried server-side.

    ``infra.prefect_app`` serves what ``prefect server start`` serves (the same
    app and services) and runs a request again while SQLite says it is locked,
    so a client never waits Prefect's fixed 2 s back-off for a lost lock race.
    """
    return [sys.executable, "-m", "infra.prefect_app", "--host", host, "--port", str(port)]


def prefect_server_env(
    home: Path,
    *,
    ui: bool = True,
    base: Mapping[str, str] | None = None,
    api_url: str | None = None,
    database_url: str | None = None,
) -> dict[str, str]:
    """The server's environment: ``base`` (default ``os.environ``), its home, the tuning,
    its database: ``database_url`` (``postgresql+asyncpg://...``), else SQLite in ``home``.

    ``PREFECT_API_URL`` is dropped: it is a client setting, and one inherited from
    a developer's shell would point the server's own services elsewhere; so are
    inherited database settings (``DATABASE_ENV``). The UI
    calls the API at ``api_url``: ``prefect server start --port`` does not tell the
    UI its own port, which would otherwise call port 4200 whatever the server's.
    """
    env = {**(os.environ if base is None else base), **PREFECT_SERVER_TUNING}
    env["PREFECT_HOME"] = str(home)
    env.pop("PREFECT_API_URL", None)
    for name in DATABASE_ENV:
        env.pop(name, None)
    if database_url is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    if not ui:
        env["PREFECT_UI_ENABLED"] = "false"
    elif api_url is not None:
        env["PREFECT_UI_API_URL"] = api_url
    return env


def start_prefect_server(
    home: Path,
    port: int,
    log: Path,
    *,
    ui: bool = True,
    host: str = "127.0.0.1",
    base_env: Mapping[str, str] | None = None,
    database_url: str | None = None,
) -> subprocess.Popen[bytes]:
    """A Prefect server on ``host:port`` with its own ``PREFECT_HOME``, logging to ``log``,
    on SQLite in that home or on the database at ``database_url``.

    It leads its own process group; stop it with ``infra.process.stop_group``.
    Wait for it with ``infra.health.wait_http_ok(f"http://{host}:{port}/api/health")``.
    """
    env = prefect_server_env(
        home,
        ui=ui,
        base=base_env,
        api_url=f"http://{host}:{port}/api",
        database_url=database_url,
    )
    return spawn(prefect_server_command(host, port), log, env)
