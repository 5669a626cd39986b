"""`canopy up`, `prefect deployment run ... --watch`, `canopy down`: what a user does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edge.cli import simulate
from edge.simulator import SimulationConfig
from flows import stack
from flows.cli import app
from infra.run_state import read_commit, read_reports
from infra.settings import S3Settings
from infra.store import S3ObjectStore


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [int(sock.getsockname()[1]) for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _simulator_params(command: list[str]) -> dict[str, object]:
    """Parse a simulator command line with the simulator's own option parser."""
    cli = typer.Typer()
    cli.command()(simulate)
    args = command[command.index("edge.simulator") + 1 :]
    with typer.main.get_command(cli).make_context("simulate", args) as ctx:
        return dict(ctx.params)


def test_simulated_fleet_defaults_are_the_simulators_realistic_ones() -> None:
    fleet = stack.SimulatedFleet()

    assert (fleet.dropout, fleet.slow_fraction, fleet.offline_fraction) == (
        SimulationConfig.dropout,
        SimulationConfig.slow_fraction,
        SimulationConfig.offline_fraction,
    )
    assert min(fleet.dropout, fleet.slow_fraction, fleet.offline_fraction) > 0


def test_simulator_command_carries_the_fleet_and_the_simulator_accepts_it() -> None:
    fleet = stack.SimulatedFleet(
        devices=12, seed=3, dropout=0.0, slow_fraction=0.0, offline_fraction=0.25
    )

    command = stack.simulator_command("xor-mobile", ["http://a:1", "http://b:2"], fleet)
    params = _simulator_params(command)

    assert command[:3] == [sys.executable, "-m", "edge.simulator"]
    assert params["job"] == "xor-mobile"
    assert params["devices"] == 12 and params["seed"] == 3
    assert params["dropout"] == 0.0 and params["slow_fraction"] == 0.0
    assert params["offline_fraction"] == 0.25
    assert params["gateway_urls"] == "http://a:1,http://b:2"
    assert params["forever"] is True


def test_check_ports_names_a_busy_port_and_its_option() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = int(busy.getsockname()[1])
        free = free_ports(3)
        ports = stack.StackPorts(prefect=free[0], s3=taken, gateways=(free[1], free[2]))

        with pytest.raises(stack.StackError, match=f"port {taken} for moto-s3 is already in use"):
            stack.check_ports(ports)

    stack.check_ports(ports)  # free again once the listener closed


def test_check_ports_refuses_a_port_given_twice() -> None:
    prefect, s3, gateway = free_ports(3)
    twice = stack.StackPorts(prefect=prefect, s3=s3, gateways=(gateway, gateway))

    message = f"gateway-1 and gateway-0 are both given port {gateway}"
    with pytest.raises(stack.StackError, match=message):
        stack.check_ports(twice)


def test_canopy_up_on_a_busy_port_fails_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = int(busy.getsockname()[1])
        s3, gw = free_ports(2)
        root = tmp_path / "stack"

        result = CliRunner().invoke(
            app,
            [
                "up",
                "--root",
                str(root),
                "--prefect-port",
                str(taken),
                "--s3-port",
                str(s3),
                "--gateway-ports",
                str(gw),
            ],
        )

    assert result.exit_code == 1
    assert f"port {taken} for prefect-server is already in use" in " ".join(result.output.split())
    assert not stack.record_path(root.resolve()).exists()


def test_canopy_up_without_the_local_extra_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = stack.importlib.util.find_spec
    monkeypatch.setattr(
        stack.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "moto" else real_find_spec(name, *a),
    )

    prefect, s3, gateway = free_ports(3)

    with pytest.raises(stack.StackError, match=r"install the 'local' extra"):
        stack.up(tmp_path / "stack", ports=stack.StackPorts(prefect, s3, (gateway,)))


def test_canopy_up_refuses_malformed_gateway_ports() -> None:
    result = CliRunner().invoke(app, ["up", "--gateway-ports", "8081,x"])

    assert result.exit_code == 2
    assert "--gateway-ports" in result.output


@pytest.mark.slow
def test_deployment_runs_against_canopy_up_and_down_stops_everything(tmp_path: Path) -> None:
    # Prepare: the stack on free ports, simulating xor-mobile devices only
    prefect_port, s3_port, gw1, gw2 = free_ports(4)
    ports = stack.StackPorts(prefect=prefect_port, s3=s3_port, gateways=(gw1, gw2))
    root = tmp_path / "stack"
    fleet = stack.SimulatedFleet(devices=8)
    record = stack.up(root, ports=ports, jobs=("xor-mobile",), fleet=fleet, log=lambda _m: None)
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
