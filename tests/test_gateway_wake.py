"""The flow nudges every gateway's round watch after writing a pointer; a hint, never a failure."""

from __future__ import annotations

import asyncio
import time

import pytest

from infra.settings import GatewaySettings
from infra.store import S3ObjectStore
from tasks.gateways import wake_gateways
from tests.support.harness import GatewayThread


def test_every_reachable_gateway_hears_the_nudge_and_an_unreachable_one_is_skipped(
    s3_store: S3ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with GatewayThread(GatewaySettings(), s3_store, gateway_id="gw-wake") as gw:
        heard: list[str] = []
        monkeypatch.setattr(gw.app.state.service.watch, "nudge", lambda job: heard.append(job))
        settings = GatewaySettings(urls=[gw.url, "http://127.0.0.1:9"])

        t0 = time.monotonic()
        asyncio.run(wake_gateways(settings, "hello-mobile"))

        assert heard == ["hello-mobile"]
        assert time.monotonic() - t0 < 5  # the dead gateway costs at most its timeout
