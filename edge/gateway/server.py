"""Run one gateway worker under uvicorn (what ``canopy gateway`` does)."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from edge.gateway.app import create_app
from infra.settings import GatewaySettings, S3Settings
from infra.store import S3ObjectStore


class UnsafeGatewayConfig(ValueError):
    """The gateway would be reachable from other hosts with secrets everybody knows."""


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the gateway on this machine (names other than
    ``localhost`` count as reachable: resolving them proves nothing about the future)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def default_secrets(settings: GatewaySettings) -> list[str]:
    """Which of the secrets still have the public default values of a local stack."""
    defaults = GatewaySettings.model_fields
    return [
        f"CANOPY_GATEWAY_{name.upper()}"
        for name in ("enrolment_secret", "token_secret")
        if getattr(settings, name).get_secret_value()
        == defaults[name].get_default(call_default_factory=True).get_secret_value()
    ]


def check_exposure(host: str, settings: GatewaySettings) -> None:
    """Refuse to serve beyond loopback with the default (published) secrets.

    With the defaults, anyone could enrol (the enrolment secret is in the
    source) and mint tokens for any device (so is the token signing key).
    """
    unsafe = default_secrets(settings)
    if unsafe and not is_loopback(host):
        raise UnsafeGatewayConfig(
            f"refusing to serve on {host!r} with the default {' and '.join(unsafe)}: anyone "
            "could enrol and forge device tokens. Set them (the same on every gateway of the "
            "fleet), or bind a loopback address such as 127.0.0.1."
        )


def serve(
    *,
    host: str,
    port: int,
    gateway_settings: GatewaySettings,
    s3_settings: S3Settings,
    certfile: str | None = None,
    keyfile: str | None = None,
    gateway_id: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve until SIGINT/SIGTERM; open update batches are written before exiting.

    One process, one event loop: start more processes (on other ports or hosts)
    to scale out; they share nothing but S3 and the token secret.
    """
    if (certfile is None) != (keyfile is None):
        raise ValueError("HTTPS needs both --certfile and --keyfile")
    check_exposure(host, gateway_settings)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    store = S3ObjectStore(s3_settings)
    app = create_app(gateway_settings, store, gateway_id=gateway_id)
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=15,
        backlog=4096,
    )
