"""`canopy up`, `prefect deployment run ... --watch`, `canopy down`: what a user does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flows import stack
from infra.run_state import read_commit, read_reports
from infra.settings import S3Settings
from infra.store import S3ObjectStore

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [int(sock.getsockname()[1]) for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def test_deployment_runs_against_canopy_up_and_down_stops_everything(tmp_path: Path) -> None:
    # Prepare: the stack on free ports, simulating xor-mobile devices only
    prefect_port, s3_port, gw1, gw2 = free_ports(4)
    ports = stack.StackPorts(prefect=prefect_port, s3=s3_port, gateways=(gw1, gw2))
    root = tmp_path / "stack"
    record = stack.up(root, ports=ports, jobs=("xor-mobile",), devices=8, log=lambda _m: None)
    try:
        env = {**os.environ, **record.env}
        prefect = str(Path(sys.executable).parent / "prefect")

        # Execute: exactly the README's command, with a fresh run id and 2 rounds
        result = subprocess.run(
            [
                prefect,
                "deployment",
                "run",
                "federated-training/xor-mobile",
                "--watch",
                "-p",
                "run_id=stack-test",
                "-p",
                "rounds=2",
                "-p",
                "num_devices=8",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )

        # Assert: the flow run completed and committed its rounds in S3
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "Completed" in result.stdout
        s3 = S3Settings(
            endpoint_url=record.env["CANOPY_S3_ENDPOINT_URL"],
            bucket="canopy",
            access_key_id="testing",
            secret_access_key="testing",
        )  # type: ignore[arg-type]
        store = S3ObjectStore(s3)
        commit = read_commit(store, "xor-mobile", "stack-test")
        assert commit is not None and commit.next_round == 2
        assert all(r.outcome == "committed" for r in read_reports(store, commit))
    finally:
        stopped = stack.down(root, log=lambda _m: None)
    # Assert: down stopped every service it started, and nothing is left running
    assert stopped == len(record.services)
    for service in record.services:
        with pytest.raises(ProcessLookupError):
            os.kill(service.pid, 0)
