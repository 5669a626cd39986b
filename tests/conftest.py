"""Shared fixtures: a real moto S3 server on 127.0.0.1, spoken to over HTTP."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer

from infra.settings import S3Settings
from infra.store import S3ObjectStore


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
