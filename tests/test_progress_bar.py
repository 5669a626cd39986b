"""The close task's progress artifact: updated in the background, never in the round's way."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import tasks.ui as ui


def test_updates_never_block_the_caller_and_the_last_count_always_lands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[float] = []
    api = asyncio.Event()  # the API answers only when the test says so

    async def create(**_: Any) -> str:
        await api.wait()
        return "artifact-1"

    async def update(*, artifact_id: str, progress: float) -> None:
        assert artifact_id == "artifact-1"
        await api.wait()
        sent.append(progress)

    monkeypatch.setattr(ui, "acreate_progress_artifact", create)
    monkeypatch.setattr(ui, "aupdate_progress_artifact", update)

    async def scenario() -> None:
        bar = ui.ProgressBar("round 3: device reports (4 needed)", total=4, min_interval_s=0.0)
        for seen in (1, 2, 3):
            bar.show(seen)  # returns at once although the API has not answered anything yet
        bar.show(4, final=True)
        assert sent == []
        api.set()
        await bar.settled()

    asyncio.run(scenario())
    # coalesced while the API was slow: the last count is shown, never an older one last
    assert sent[-1] == 100.0 and sent == sorted(sent) and len(sent) <= 2


def test_a_failing_api_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def create(**_: Any) -> str:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(ui, "acreate_progress_artifact", create)

    async def scenario() -> None:
        bar = ui.ProgressBar("round 0", total=2)
        bar.show(2, final=True)
        await bar.settled()

    asyncio.run(scenario())
    assert "progress artifact not updated: database is locked" in caplog.text
