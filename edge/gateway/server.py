"""Run one gateway worker under uvicorn (what ``canopy gateway`` does)."""

from __future__ import annotations

import logging

import uvicorn

from edge.gateway.app import create_app
from infra.settings import GatewaySettings, S3Settings
from infra.store import S3ObjectStore


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
