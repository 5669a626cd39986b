"""Shared fixtures: a real moto S3 server and a real Prefect server, both on 127.0.0.1,
and the local stack the end-to-end tests run the flow against (tests.support.stack)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.postgres import PostgresCluster
from infra.settings import GatewaySettings, S3Settings
from infra.store import S3ObjectStore
from tests.support.harness import GatewayThread, settings_env
from tests.support.postgres import requested_database, session_postgres
from tests.support.stack import (
    MANIFEST_CACHE_S,
    LocalStack,
    PrefectServer,
    fresh_bucket,
    moto_server,
)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server for the whole session; tests isolate themselves by bucket."""
    with moto_server() as url:
        yield url


@pytest.fixture
def s3_settings(moto_endpoint: str) -> S3Settings:
    return fresh_bucket(moto_endpoint)


@pytest.fixture
def s3_store(s3_settings: S3Settings) -> S3ObjectStore:
    return S3ObjectStore(s3_settings)


@pytest.fixture
def s3_env(s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch) -> S3Settings:
    """Point what reads ``CANOPY_S3_*`` in this process (the CLI, a flow) at the test's bucket."""
    for name, value in settings_env(s3_settings).items():
        monkeypatch.setenv(name, value)
    return s3_settings


@pytest.fixture(scope="session")
def prefect_postgres() -> Iterator[PostgresCluster | None]:
    """The session's PostgreSQL when ``CANOPY_TEST_DATABASE=postgres``, else None (SQLite).

    Started by ``infra.postgres`` as ``canopy up --database postgres`` starts it; if it
    cannot start, every test that needs Prefect errors with the reason.
    """
    if requested_database() != "postgres":
        yield None
        return
    with session_postgres() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def prefect_api(
    tmp_path_factory: pytest.TempPathFactory, prefect_postgres: PostgresCluster | None
) -> Iterator[str]:
    """A real Prefect server (tuned like `canopy up`), shared by the session: on SQLite,
    or on the session's PostgreSQL with ``CANOPY_TEST_DATABASE=postgres``.

    Started once (about 10 s) with its own PREFECT_HOME, so no state leaks from a
    developer's machine or between sessions; stopped with SIGTERM.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    database_url = prefect_postgres.url() if prefect_postgres is not None else None
    with (
        PrefectServer(tmp_path_factory.mktemp("prefect-home"), database_url=database_url) as server,
        temporary_settings(updates={PREFECT_API_URL: server.url}),
    ):
        os.environ["PREFECT_API_URL"] = server.url  # for subprocesses the tests start
        try:
            yield server.url
        finally:
            os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture
def local_stack(
    s3_env: S3Settings,
    s3_store: S3ObjectStore,
    prefect_api: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[LocalStack]:
    """Two gateway threads over the test's bucket; the flow (``run_flow``) reports to
    the session's Prefect server and finds the bucket through ``CANOPY_S3_*``."""
    del prefect_api  # PREFECT_API_URL is in the environment
    monkeypatch.setenv("CANOPY_GATEWAY_MANIFEST_CACHE_SECONDS", MANIFEST_CACHE_S)
    settings = GatewaySettings()
    with (
        GatewayThread(settings, s3_store, gateway_id="gw-a") as a,
        GatewayThread(settings, s3_store, gateway_id="gw-b") as b,
    ):
        stack = LocalStack(s3=s3_env, store=s3_store, gateways=[a.url, b.url], tmp=tmp_path)
        try:
            yield stack
        finally:
            stack.close()
