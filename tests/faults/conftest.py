"""Fixtures of the fault tests: ``make_stack`` builds a ``tests.faults.stack.FaultStack``."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

from infra.settings import GatewaySettings, S3Settings
from infra.store import S3ObjectStore
from tests.faults.accounting import ReceiptLedger
from tests.faults.stack import MANIFEST_CACHE_S, FaultStack
from tests.support.faulty_s3 import FaultPlan, FaultyProxy
from tests.support.harness import GatewayProcess, GatewayThread, settings_env

StackMaker = Callable[..., FaultStack]


@pytest.fixture
def make_stack(
    s3_settings: S3Settings,
    s3_store: S3ObjectStore,
    prefect_api: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[StackMaker]:
    """Build a ``FaultStack``: ``make_stack(gateways="thread"|"process", s3_plan=FaultPlan)``.

    With ``s3_plan`` the gateways and the flow each reach S3 through their own
    fault proxy (the same plan, seeded differently, counted apart); the
    environment of this process (where in-process flows read their settings)
    points at the flow's.
    """
    del prefect_api  # the session's Prefect server: PREFECT_API_URL is in the environment
    with contextlib.ExitStack() as stack:

        def make(
            *,
            gateways: Literal["thread", "process"] = "thread",
            count: int = 2,
            s3_plan: FaultPlan | None = None,
        ) -> FaultStack:
            proxies: dict[str, FaultyProxy] = {}
            via: dict[str, S3Settings] = {"gateways": s3_settings, "flow": s3_settings}
            if s3_plan is not None:
                for offset, side in enumerate(via):
                    plan = dataclasses.replace(s3_plan, seed=s3_plan.seed + offset)
                    proxy = stack.enter_context(FaultyProxy(s3_settings.endpoint_url or "", plan))
                    proxies[side] = proxy
                    via[side] = s3_settings.model_copy(update={"endpoint_url": proxy.url})
            service = via["gateways"]
            for name, value in settings_env(via["flow"]).items():
                monkeypatch.setenv(name, value)
            monkeypatch.setenv("CANOPY_GATEWAY_MANIFEST_CACHE_SECONDS", MANIFEST_CACHE_S)
            gw_settings = GatewaySettings()
            ledger = ReceiptLedger()
            gws: list[GatewayProcess | GatewayThread] = []
            taps: list[FaultyProxy] = []
            for i in range(count):
                gw_id = f"gw-{chr(ord('a') + i)}"
                gw: GatewayProcess | GatewayThread
                if gateways == "process":
                    gw = stack.enter_context(GatewayProcess(service, gw_settings, gateway_id=gw_id))
                else:
                    gw = stack.enter_context(
                        GatewayThread(gw_settings, S3ObjectStore(service), gateway_id=gw_id)
                    )
                gws.append(gw)
                taps.append(stack.enter_context(FaultyProxy(gw.url, observer=ledger.observe)))
            built = FaultStack(
                s3=s3_settings,
                store=s3_store,
                gateway_s3=service,
                flow_s3=via["flow"],
                s3_proxies=proxies,
                gateways=gws,
                taps=taps,
                ledger=ledger,
                tmp=tmp_path,
            )
            stack.callback(built.close)
            return built

        yield make
