"""Every error a gateway answers, as an ``ErrorBody`` JSON with a machine-readable code.

FastAPI's own validation errors, unknown paths and methods, and unexpected
exceptions are mapped too, so a device never has to parse HTML or guess.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge.gateway.metrics import GatewayMetrics
from edge.protocol import ErrorCode, ProtocolError

log = logging.getLogger("canopy.gateway")


def error_response(
    exc: ProtocolError, metrics: GatewayMetrics, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    metrics.errors.labels(status=str(exc.status), code=exc.code.value).inc()
    headers = dict(headers or {})
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(exc.body().model_dump(mode="json"), status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
    """Answer every failure, ours or the framework's, as an ``ErrorBody``."""

    @app.exception_handler(ProtocolError)
    async def protocol_error(_: Request, exc: ProtocolError) -> JSONResponse:
        return error_response(exc, metrics)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
            for err in exc.errors()[:5]
        )
        return error_response(
            ProtocolError(422, ErrorCode.BAD_REQUEST, f"invalid request: {problems}"), metrics
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(
            exc.status_code, ErrorCode.BAD_REQUEST
        )
        # Starlette puts ``Allow`` on its 405s; RFC 9110 (15.5.6) requires it, so keep it.
        return error_response(
            ProtocolError(exc.status_code, code, str(exc.detail)), metrics, exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering a device", exc_info=exc)
        return error_response(
            ProtocolError(500, ErrorCode.INTERNAL, "internal gateway error; retry later"), metrics
        )
