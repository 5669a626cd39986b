"""Fixtures of the fault tests: ``make_stack`` builds a ``tests.faults.stack.FaultStack``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.settings import S3Settings
from infra.store import S3ObjectStore
from tests.faults.stack import FaultStack, StackMaker, build_stack


@pytest.fixture
def make_stack(
    s3_settings: S3Settings,
    s3_store: S3ObjectStore,
    prefect_api: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[StackMaker]:
    """Build a ``FaultStack``: ``make_stack(gateways="thread"|"process", s3_plan=FaultPlan)``.

    See ``tests.faults.stack.build_stack``; the environment of this process
    (where in-process flows read their settings) points at the flow's S3 side
    until the test ends.
    """
    del prefect_api  # the session's Prefect server: PREFECT_API_URL is in the environment
    with contextlib.ExitStack() as exits:

        def make(**options: Any) -> FaultStack:
            return build_stack(
                exits,
                s3=s3_settings,
                store=s3_store,
                tmp=tmp_path,
                setenv=monkeypatch.setenv,
                **options,
            )

        yield make
