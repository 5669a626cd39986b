"""Shared fixtures: a real moto S3 server and a real Prefect server, both on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer

from infra.settings import S3Settings
from infra.store import S3ObjectStore
from tests.support.harness import free_port


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server for the whole session; tests isolate themselves by bucket."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_settings(moto_endpoint: str) -> S3Settings:
    return S3Settings(
        endpoint_url=moto_endpoint,
        bucket=f"test-{uuid.uuid4().hex[:12]}",
        access_key_id="testing",
        secret_access_key="testing",  # type: ignore[arg-type]
        create_bucket=True,
    )


@pytest.fixture
def s3_store(s3_settings: S3Settings) -> S3ObjectStore:
    return S3ObjectStore(s3_settings)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server (SQLite, tuned like `canopy up`), shared by the session.

    Started once (about 10 s) with its own PREFECT_HOME, so no state leaks from a
    developer's machine or between sessions; stopped with SIGTERM.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra.health import wait_http_ok as wait_healthy
    from infra.prefect_server import start_prefect_server

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    proc = start_prefect_server(home, port, home / "server.log", ui=False)
    wait_healthy(f"{url}/health", proc)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            os.environ["PREFECT_API_URL"] = url  # for subprocesses the tests start
            yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
