"""The gateway's HTTP surface: ``create_app(settings, store)`` for uvicorn.

Routes only translate HTTP to ``GatewayService`` calls and back; every check
lives in the service and in ``edge.protocol``. Every error, including FastAPI's
own validation errors and unknown paths, is answered as an ``ErrorBody`` JSON
with a machine-readable ``code``, so a device never has to parse HTML or
guess. ``docs/protocol.md`` describes the same surface for humans.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge.gateway.metrics import GatewayMetrics
from edge.gateway.middleware import ObservabilityMiddleware
from edge.gateway.service import GatewayService, GatewayTuning
from edge.protocol import (
    API_PREFIX,
    DEVICE_ID_PATTERN,
    HEADER_GATEWAY,
    HEADER_METRICS,
    HEADER_MODEL_FORMAT,
    HEADER_MODEL_VERSION,
    HEADER_NUM_SAMPLES,
    HEADER_SHA256,
    MAX_JSON_BODY_BYTES,
    UPDATE_CONTENT_TYPES,
    EnrolRequest,
    EnrolResponse,
    ErrorBody,
    ErrorCode,
    Health,
    ModelFormat,
    PollAnswer,
    ProtocolError,
    UploadReceipt,
    parse_metrics,
    parse_num_samples,
    parse_range,
)
from infra.settings import GatewaySettings
from infra.store import ObjectStore

log = logging.getLogger("canopy.gateway")

_RANGE_HEADER = {
    "name": "Range",
    "in": "header",
    "required": False,
    "description": "bytes=START-[END] or bytes=-SUFFIX, to resume a download (206).",
    "schema": {"type": "string"},
}
# Headers and the bearer token are read from ``request.headers`` and documented
# through ``openapi_extra``: as FastAPI parameters they cost ~0.5 ms of dependency
# solving per request, a third of a gateway's time per upload.
_BEARER = [{"deviceToken": []}]
_UPLOAD_HEADERS = [
    {
        "name": HEADER_MODEL_VERSION,
        "in": "header",
        "required": True,
        "description": "The offer's model_version (sha256 of the global model).",
        "schema": {"type": "string"},
    },
    {
        "name": HEADER_NUM_SAMPLES,
        "in": "header",
        "required": True,
        "description": "Local training examples, 1..1e9 (the aggregation weight).",
        "schema": {"type": "integer", "minimum": 1},
    },
    {
        "name": HEADER_METRICS,
        "in": "header",
        "required": False,
        "description": 'JSON object of finite numbers, e.g. {"loss": 0.4} (<= 4 KiB).',
        "schema": {"type": "string"},
    },
]

_ID = re.compile(DEVICE_ID_PATTERN)
_PATH_DOCS = {
    "job": ("Job name.", {"type": "string", "pattern": DEVICE_ID_PATTERN}),
    "device_id": (
        "The device's id (the token's device).",
        {"type": "string", "pattern": DEVICE_ID_PATTERN},
    ),
    "task_id": ("Task id of the offer.", {"type": "string", "minLength": 1, "maxLength": 256}),
}
_FORMAT = {
    "name": "format",
    "in": "query",
    "required": False,
    "description": "pte or safetensors; default: what the offer's runtime trains with.",
    "schema": {"type": "string", "enum": ["pte", "safetensors"]},
}


def _path_params(*names: str) -> list[dict[str, Any]]:
    return [
        {
            "name": n,
            "in": "path",
            "required": True,
            "description": _PATH_DOCS[n][0],
            "schema": _PATH_DOCS[n][1],
        }
        for n in names
    ]


def _ids(request: Request, *names: str) -> tuple[str, ...]:
    """Path parameters, checked by hand (FastAPI's per-parameter validation is the slow part)."""
    values = tuple(str(request.path_params[name]) for name in names)
    for name, value in zip(names, values, strict=True):
        ok = 0 < len(value) <= 256 if name == "task_id" else _ID.match(value) is not None
        if not ok:
            raise ProtocolError(
                422, ErrorCode.BAD_REQUEST, f"path parameter {name} {value[:64]!r} is invalid"
            )
    return values


def _format(request: Request) -> ModelFormat | None:
    value = request.query_params.get("format")
    if value is None:
        return None
    if value not in ("pte", "safetensors"):
        raise ProtocolError(
            422, ErrorCode.BAD_REQUEST, "query parameter format must be pte or safetensors"
        )
    return value  # type: ignore[return-value]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


class BodyBudget:
    """Bytes of request bodies held in memory at once, over all requests of a gateway.

    The per-request limit (413) alone does not bound memory: a hundred devices
    sending 64 MiB each at once would. Beyond the budget, uploads get a 503 with
    Retry-After and come back later.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise ProtocolError(
                503,
                ErrorCode.OVERLOADED,
                "the gateway is holding too many uploads in memory; retry shortly",
                retry_after=2.0,
            )
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size


async def read_body(request: Request, limit: int, budget: BodyBudget) -> bytes:
    """Read the body, refusing with 413 as soon as it passes ``limit`` bytes.

    The bytes read are taken from ``budget``; the caller gives back ``len(body)``
    when done with it (on failure here, this function gives them back itself).
    """
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.strip().isascii()
        and declared.strip().isdigit()
        and int(declared) > limit
    ):
        raise _too_large(limit)
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            if total + len(chunk) > limit:
                raise _too_large(limit)
            budget.take(len(chunk))
            total += len(chunk)
            chunks.append(chunk)
    except BaseException:
        budget.give(total)
        raise
    return b"".join(chunks)


def _too_large(limit: int) -> ProtocolError:
    return ProtocolError(
        413,
        ErrorCode.BODY_TOO_LARGE,
        f"request body is over the gateway's limit of {limit} bytes",
        details={"max_body_bytes": limit},
    )


def create_app(
    settings: GatewaySettings,
    store: ObjectStore,
    *,
    gateway_id: str | None = None,
    tuning: GatewayTuning | None = None,
) -> FastAPI:
    """A gateway worker app; run as many as you like over the same store and settings."""
    metrics = GatewayMetrics()
    service = GatewayService(
        settings,
        store,
        gateway_id=gateway_id or f"gw-{uuid.uuid4().hex[:10]}",
        metrics=metrics,
        tuning=tuning,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        log.info("gateway %s serving bucket %s", service.gateway_id, store.bucket)
        yield
        await service.close()  # write batches still open; their devices are waiting

    app = FastAPI(
        title="Canopy device gateway",
        version="1",
        summary="Enrol, fetch a round's task and model, upload a safetensors update.",
        description="See docs/protocol.md for the walkthrough and a sequence diagram.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.add_middleware(
        ObservabilityMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes
    )
    _install_error_handlers(app, metrics)
    gateway_header = {HEADER_GATEWAY: service.gateway_id}
    budget = BodyBudget(max(service.tuning.body_budget_bytes, settings.max_body_bytes))

    @app.post(
        f"{API_PREFIX}/enrol",
        response_model=EnrolResponse,
        responses=_errors(401, 413, 422, 503),
        openapi_extra=_json_body("EnrolRequest"),
        summary="Enrol a device and get its token",
    )
    async def enrol(request: Request) -> EnrolResponse:
        body = await read_body(request, MAX_JSON_BODY_BYTES, budget)
        budget.give(len(body))  # parsed at once; small
        try:
            enrol_request = EnrolRequest.model_validate_json(body)
        except ValueError as exc:
            raise ProtocolError(
                422, ErrorCode.BAD_REQUEST, f"invalid enrolment request: {_short(exc)}"
            ) from exc
        return await service.enrol(enrol_request)

    @app.get(
        f"{API_PREFIX}/jobs/{{job}}/devices/{{device_id}}/task",
        response_model=PollAnswer,
        responses=_errors(401, 403, 404, 422, 503),
        openapi_extra={"security": _BEARER, "parameters": _path_params("job", "device_id")},
        summary="Ask for work: a task, retry later, no job, or done",
    )
    async def poll(request: Request) -> Any:
        job, device_id = _ids(request, "job", "device_id")
        claims = service.authenticate(request.headers.get("authorization"), device_id)
        answer = await service.poll(job, claims)
        metrics.poll_answers.labels(answer=getattr(answer, "reason", answer.status)).inc()
        headers = dict(gateway_header)
        if (retry := getattr(answer, "retry_after_seconds", None)) is not None:
            headers["Retry-After"] = str(max(1, round(retry)))
        return JSONResponse(answer.model_dump(mode="json"), headers=headers)

    @app.get(
        f"{API_PREFIX}/jobs/{{job}}/devices/{{device_id}}/tasks/{{task_id}}/model",
        responses={
            200: {"content": {"application/octet-stream": {}}, "description": "The artifact."},
            206: {"content": {"application/octet-stream": {}}, "description": "A byte range."},
            **_errors(401, 403, 404, 409, 416, 422, 503),
        },
        response_class=Response,
        openapi_extra={
            "security": _BEARER,
            "parameters": [*_path_params("job", "device_id", "task_id"), _FORMAT, _RANGE_HEADER],
        },
        summary="Download the round's model (.pte or safetensors), HTTP Range supported",
    )
    async def model(request: Request) -> Response:
        job, device_id, task_id = _ids(request, "job", "device_id", "task_id")
        claims = service.authenticate(request.headers.get("authorization"), device_id)
        data, ref, fmt, task = await service.model(job, claims, task_id, _format(request))
        headers = {
            **gateway_header,
            HEADER_SHA256: ref.sha256,
            HEADER_MODEL_VERSION: task.model_version,
            HEADER_MODEL_FORMAT: fmt,
            "ETag": f'"{ref.sha256}"',
            "Accept-Ranges": "bytes",
        }
        span = parse_range(request.headers.get("range"), len(data))
        if span is None:
            return Response(data, media_type="application/octet-stream", headers=headers)
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return Response(
            data[start : end + 1],
            status_code=206,
            media_type="application/octet-stream",
            headers=headers,
        )

    @app.post(
        f"{API_PREFIX}/jobs/{{job}}/devices/{{device_id}}/tasks/{{task_id}}/result",
        response_model=UploadReceipt,
        responses=_errors(401, 403, 409, 413, 415, 422, 503),
        openapi_extra={
            **_binary_body(),
            "security": _BEARER,
            "parameters": [*_path_params("job", "device_id", "task_id"), *_UPLOAD_HEADERS],
        },
        summary="Upload the update (new - old) as safetensors",
    )
    async def upload(request: Request) -> Any:
        headers = request.headers
        model_version = headers.get(HEADER_MODEL_VERSION)
        try:
            job, device_id, task_id = _ids(request, "job", "device_id", "task_id")
            claims = service.authenticate(request.headers.get("authorization"), device_id)
            checked = await service.check_upload(job, claims, task_id, model_version)
            if isinstance(checked, UploadReceipt):
                return JSONResponse(checked.model_dump(mode="json"), headers=gateway_header)
            samples = parse_num_samples(headers.get(HEADER_NUM_SAMPLES))
            values = parse_metrics(headers.get(HEADER_METRICS))
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type not in UPDATE_CONTENT_TYPES:
                raise ProtocolError(
                    415,
                    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                    f"the update must be a safetensors body sent as one of {UPDATE_CONTENT_TYPES}, "
                    f"got {content_type or 'no Content-Type'!r}",
                )
            body = await read_body(request, settings.max_body_bytes, budget)
            try:
                receipt = await service.accept(
                    checked, claims, body, num_samples=samples, metrics=values
                )
            finally:
                budget.give(len(body))
        except ProtocolError as exc:
            metrics.results_rejected.labels(reason=exc.code.value).inc()
            raise
        return JSONResponse(receipt.model_dump(mode="json"), headers=gateway_header)

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> Health:
        return Health(gateway_id=service.gateway_id, pending_updates=service.committer.pending)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _install_openapi(app)
    return app


def _short(exc: Exception) -> str:
    text = str(exc).replace("\n", "; ")
    return text[:500]


def _json_body(schema: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }


def _binary_body() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "description": "The update (trained minus global parameters) as safetensors bytes.",
            "content": {
                content_type: {"schema": {"type": "string", "format": "binary"}}
                for content_type in UPDATE_CONTENT_TYPES
            },
        }
    }


def _install_openapi(app: FastAPI) -> None:
    """Add the schemas of bodies read by hand (enrolment) to the generated OpenAPI."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "deviceToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The token from POST /v1/enrol, as 'Bearer <token>'.",
                }
            }
            components = schema["components"].setdefault("schemas", {})
            extra = EnrolRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(extra.pop("$defs", {}))
            components["EnrolRequest"] = extra
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _error_response(exc: ProtocolError, metrics: GatewayMetrics) -> JSONResponse:
    metrics.errors.labels(status=str(exc.status), code=exc.code.value).inc()
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(exc.body().model_dump(mode="json"), status_code=exc.status, headers=headers)


def _install_error_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
    async def protocol_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProtocolError)
        return _error_response(exc, metrics)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
            for err in exc.errors()[:5]
        )
        return _error_response(
            ProtocolError(422, ErrorCode.BAD_REQUEST, f"invalid request: {problems}"), metrics
        )

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(
            exc.status_code, ErrorCode.BAD_REQUEST
        )
        return _error_response(ProtocolError(exc.status_code, code, str(exc.detail)), metrics)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering a device", exc_info=exc)
        return _error_response(
            ProtocolError(500, ErrorCode.INTERNAL, "internal gateway error; retry later"), metrics
        )

    app.add_exception_handler(ProtocolError, protocol_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
