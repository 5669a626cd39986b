"""The edge commands are registered on ``canopy`` and validate their flags."""

from __future__ import annotations

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_gateway_and_simulate_are_canopy_commands() -> None:
    gateway = runner.invoke(app, ["gateway", "--help"])
    simulate = runner.invoke(app, ["simulate", "--help"])

    assert gateway.exit_code == 0
    for flag in ("--port", "--host", "--certfile", "--keyfile"):
        assert flag in gateway.output
    assert simulate.exit_code == 0
    for flag in (
        "--job",
        "--devices",
        "--gateway",
        "--seed",
        "--runtime",
        "--rounds",
        "--max-seconds",
    ):
        assert flag in simulate.output


def test_bad_flags_are_refused_before_anything_starts() -> None:
    half_tls = runner.invoke(app, ["gateway", "--certfile", "cert.pem"])
    bad_runtime = runner.invoke(
        app,
        [
            "simulate",
            "--job",
            "hello-mobile",
            "--gateway",
            "http://127.0.0.1:1",
            "--runtime",
            "tpu",
        ],
    )

    assert half_tls.exit_code != 0 and "keyfile" in half_tls.output
    assert bad_runtime.exit_code != 0 and "runtime" in bad_runtime.output
