"""The Prefect server restarted mid-round: the run finishes or fails clearly, and resumes.

The test has its own Prefect server (SQLite, tuned like ``canopy up``, through
``infra.prefect_server``) so that stopping it disturbs nobody else. The flow
runs in a subprocess against it. Once round 1 is open, the server gets SIGTERM;
it is started again on the same port with the same ``PREFECT_HOME`` (the same
database). Prefect's client retries its API calls (5 times, backing off 2, 4,
8, ... s), so the flow may ride the outage out; if it does not, it must exit
with an error rather than hang. Either way the same run id is then run again:
it resumes from the last commit in S3 and applies no round twice.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.health import wait_http_ok
from infra.keys import partial_key
from infra.prefect_server import start_prefect_server
from infra.process import stop_group
from infra.run_state import read_commit, read_reports
from tests.faults.accounting import account_run, deadline_overruns, reconcile
from tests.faults.conftest import StackMaker
from tests.faults.stack import JOB, wait_for
from tests.support.harness import free_port

pytestmark = pytest.mark.slow

DEVICES = 8
DEADLINE_S = 30.0
PARAMS: dict[str, Any] = {
    "job": JOB,
    "runtime": "pytorch",
    "rounds": 3,
    "tree": {"depth": 1, "width": 2},
    "cohort_size": 6,
    "over_selection": 1.0,
    "min_reports": 3,
    "round_deadline_s": DEADLINE_S,
    "registry_wait_s": 30,
    "num_devices": DEVICES,
    "partition": {"kind": "iid"},
}


class PrefectServer:
    """A dedicated Prefect server that can be stopped and started again in place."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.home / f"server-{self.starts}.log"
        self.proc = start_prefect_server(self.home, self.port, log, ui=False)
        wait_http_ok(f"{self.url}/health", self.proc, timeout=120, what="prefect server")

    def stop(self) -> None:
        """SIGTERM to its process group (SIGKILL after 20 s), as ``canopy down`` does."""
        if self.proc is not None:
            stop_group(self.proc.pid, timeout_s=20)
            self.proc = None


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[PrefectServer]:
    home = tmp_path / "prefect-home"
    home.mkdir()
    server = PrefectServer(home)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_prefect_server_restarted_mid_round_then_resumed_applies_no_round_twice(
    make_stack: StackMaker, prefect_server: PrefectServer
) -> None:
    stack = make_stack()
    first = stack.flow_process("first", PREFECT_API_URL=prefect_server.url)
    again = stack.flow_process("again", PREFECT_API_URL=prefect_server.url)
    sim = stack.simulate(
        DEVICES, seed=9, dropout=0.0, slow_fraction=0.0, offline_fraction=0.0, max_seconds=300
    )
    stack.warm_up(sim)
    run_id = f"restart-{uuid.uuid4().hex[:6]}"
    params = {**PARAMS, "run_id": run_id}

    # Round 1 opens; the server goes away and comes back on the same port and database.
    first.launch(params)
    wait_for(lambda: round_open(stack.active(), run_id, 1), 150, "round 1 to open", 0.05)
    stopped = time.monotonic()
    prefect_server.stop()
    prefect_server.start()
    outage = time.monotonic() - stopped
    code = first.wait(timeout=240)  # finished, or failed: not hung
    if code != 0:
        assert "Traceback" in first.tail() or "Error" in first.tail(), first.tail()
    after_first = read_commit(stack.store, JOB, run_id)

    # The same run id again: it resumes from commit.json and applies no round twice.
    again.launch(params)
    assert again.wait(timeout=240) == 0, again.tail()
    summary = sim.finish()

    commit = read_commit(stack.store, JOB, run_id)
    assert commit is not None and commit.next_round == 3
    reports = read_reports(stack.store, commit)
    assert [r.round for r in reports] == [0, 1, 2]
    assert all(r.outcome == "committed" for r in reports)
    assert deadline_overruns(reports, DEADLINE_S, slack_s=3.0) == []
    if after_first is not None:  # what the first run committed was kept, not redone
        assert commit.reports[: len(after_first.reports)] == after_first.reports
    for rnd in range(3):
        assert stack.store.head(partial_key(JOB, run_id, rnd, "root"))

    verdict = reconcile(stack.ledger.acknowledged(run_id), account_run(stack.store, JOB, run_id))
    assert verdict.problems == [], verdict.problems
    assert verdict.lost == [] and verdict.doubled == 0, verdict.line()
    assert len(stack.ledger.receipts()) == summary["accepted"] + summary["duplicates"]
    print(
        f"outage {outage:.1f}s; first flow exit code {code}, committed "
        f"{after_first.next_round if after_first else 0} round(s); {verdict.line()}"
    )


def round_open(active: dict[str, Any] | None, run_id: str, rnd: int) -> bool:
    return (
        active is not None
        and active["run_id"] == run_id
        and active["round"] == rnd
        and active["status"] == "open"
    )
