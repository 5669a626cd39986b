"""Fixtures of the edge tests: one gateway (uvicorn in a thread) over the test's bucket."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from infra.store import S3ObjectStore
from tests.edge.devices import gateway_settings
from tests.support.harness import GatewayThread


@pytest.fixture
def gateway(s3_store: S3ObjectStore) -> Iterator[GatewayThread]:
    with GatewayThread(gateway_settings(), s3_store, gateway_id="gw-test") as gw:
        yield gw


@pytest.fixture
def client(gateway: GatewayThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        yield c
