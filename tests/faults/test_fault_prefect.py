"""The Prefect server restarted mid-round: the run finishes or fails clearly, and resumes.

The scenario is ``tests.faults.scenarios.prefect_restart`` (shared with
benchmarks/faults.py). The test has its own Prefect server (SQLite, tuned like
``canopy up``: ``tests.faults.stack.PrefectServer``) so that stopping it
disturbs nobody else. Prefect's client retries its API calls (5 times, backing
off 2, 4, 8, ... s), so the flow may ride the outage out; if it does not, it
must exit with an error rather than hang. Either way the same run id is then
run again: it resumes from the last commit in S3 and applies no round twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.scenarios import prefect_restart
from tests.faults.stack import PrefectServer, StackMaker

pytestmark = pytest.mark.slow


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[PrefectServer]:
    home = tmp_path / "prefect-home"
    home.mkdir()
    server = PrefectServer(home).start()
    try:
        yield server
    finally:
        server.stop()


def test_prefect_server_restarted_mid_round_then_resumed_applies_no_round_twice(
    make_stack: StackMaker, prefect_server: PrefectServer
) -> None:
    out = prefect_restart(make_stack, prefect_server)

    assert out.problems == [], out.problems
    assert out.lost == 0 and out.doubled == 0
    assert out.committed == 3 and out.faults == {"Prefect server restart": 1}
    print(*(v.line() for v in out.verdicts.values()), "|", *out.notes)
