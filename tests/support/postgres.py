"""Which database the test session's Prefect server runs on: ``CANOPY_TEST_DATABASE``.

``sqlite`` (the default) is the server's own file in its home. ``postgres`` starts a
PostgreSQL for the session with ``infra.postgres`` (as ``canopy up --database
postgres`` does) and points the server at it; ``make test`` runs the end-to-end tests
once more that way. Asked for and not startable (not installed, refused), it fails
the session's first test that needs Prefect with the reason, never falls back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from infra.postgres import PostgresCluster, running_postgres
from tests.support.harness import free_port

TEST_DATABASE_ENV = "CANOPY_TEST_DATABASE"
DATABASES = ("sqlite", "postgres")


def requested_database() -> str:
    value = os.environ.get(TEST_DATABASE_ENV, "sqlite").strip().lower() or "sqlite"
    if value not in DATABASES:
        raise ValueError(f"{TEST_DATABASE_ENV}={value!r}: use one of {', '.join(DATABASES)}")
    return value


@contextlib.contextmanager
def session_postgres() -> Iterator[PostgresCluster]:
    """A fresh PostgreSQL on a free port for the ``with`` block, removed afterwards.

    Its folder is made under the system's temp folder, not pytest's (which only its
    owner may enter), because as root the server runs as the ``postgres`` user.
    """
    folder = Path(tempfile.mkdtemp(prefix="canopy-test-postgres-"))
    try:
        folder.chmod(0o755)
        cluster = PostgresCluster(folder / "cluster", port=free_port())
        with running_postgres(cluster, folder / "postgres.log"):
            yield cluster
    finally:
        shutil.rmtree(folder, ignore_errors=True)
