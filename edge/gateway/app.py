"""The gateway's HTTP surface: ``create_app(settings, store)`` for uvicorn.

Routes only translate HTTP to ``GatewayService`` calls and back; every check
lives in the service and in ``edge.protocol``. Every error, including FastAPI's
own validation errors and unknown paths, is answered as an ``ErrorBody`` JSON
with a machine-readable ``code``, so a device never has to parse HTML or
guess. ``docs/protocol.md`` describes the same surface for humans.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge.gateway.bodies import BodyBudget, read_body
from edge.gateway.errors import install_error_handlers
from edge.gateway.metrics import GatewayMetrics
from edge.gateway.middleware import ObservabilityMiddleware
from edge.gateway.openapi import (
    BEARER,
    FORMAT_PARAM,
    RANGE_HEADER,
    UPLOAD_HEADERS,
    binary_body,
    error_responses,
    install_openapi,
    json_body,
    path_params,
    wait_param,
)
from edge.gateway.service import GatewayService
from edge.gateway.tuning import GatewayTuning
from edge.gateway.upload_route import (
    UPLOAD_PARAMS,
    UPLOAD_TEMPLATE,
    UploadHandler,
    UploadRoute,
    check_ids,
)
from edge.protocol import (
    API_PREFIX,
    HEADER_GATEWAY,
    HEADER_MODEL_FORMAT,
    HEADER_MODEL_VERSION,
    HEADER_SHA256,
    MAX_JSON_BODY_BYTES,
    ChallengeRequest,
    ChallengeResponse,
    EnrolRequest,
    EnrolResponse,
    ErrorCode,
    Health,
    ModelFormat,
    PollAnswer,
    ProtocolError,
    UploadReceipt,
    WakeAnswer,
    parse_range,
)
from infra.settings import GatewaySettings
from infra.store import ObjectStore

log = logging.getLogger("canopy.gateway")


def _ids(request: Request, *names: str) -> tuple[str, ...]:
    """Path parameters, checked by hand (FastAPI's per-parameter validation is the slow part)."""
    return check_ids(names, [str(request.path_params[name]) for name in names])


def _format(request: Request) -> ModelFormat | None:
    value = request.query_params.get("format")
    if value is None:
        return None
    if value not in ("pte", "safetensors"):
        raise ProtocolError(
            422, ErrorCode.BAD_REQUEST, "query parameter format must be pte or safetensors"
        )
    return value  # type: ignore[return-value]


def _wait(request: Request, longest: float) -> float:
    """The ``wait`` query parameter: how long a poll may be held (0 to ``longest`` s)."""
    value = request.query_params.get("wait")
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0.0 <= seconds <= longest:  # also refuses nan and inf
        raise ProtocolError(
            422,
            ErrorCode.BAD_REQUEST,
            f"query parameter wait must be a number of seconds from 0 to {longest:g}",
        )
    return seconds


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
        summary="Enrol, fetch a round's task and model, upload a safetensors update "
        "(or, for an evaluation task, its metrics).",
        description="See docs/protocol.md for the walkthrough and a sequence diagram.",
        lifespan=lifespan,
        # The gateway's metrics are Prometheus (/metrics). FastAPI's native OpenTelemetry
        # hooks would look up three global providers on every request to find them unset.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service = service
    app.state.metrics = metrics
    install_error_handlers(app, metrics)
    gateway_header = {HEADER_GATEWAY: service.gateway_id}
    budget = BodyBudget(max(service.tuning.body_budget_bytes, settings.max_body_bytes))
    uploads = UploadHandler(service, metrics, settings, budget)
    # Added first, so it runs inside the observability middleware (timed and counted).
    app.add_middleware(UploadRoute, handler=uploads, gateway_id=service.gateway_id)
    app.add_middleware(
        ObservabilityMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes
    )

    @app.post(
        f"{API_PREFIX}/enrol/challenge",
        response_model=ChallengeResponse,
        responses=error_responses(413, 422),
        openapi_extra=json_body("ChallengeRequest"),
        summary="Get a challenge to sign with the device's key (the first step of enrolment)",
    )
    async def challenge(request: Request) -> ChallengeResponse:
        body = await read_body(request, MAX_JSON_BODY_BYTES, budget)
        budget.give(len(body))
        try:
            asked = ChallengeRequest.model_validate_json(body)
        except ValueError as exc:
            raise ProtocolError(
                422, ErrorCode.BAD_REQUEST, f"invalid challenge request: {_short(exc)}"
            ) from exc
        return service.challenge(asked)

    @app.post(
        f"{API_PREFIX}/enrol",
        response_model=EnrolResponse,
        responses=error_responses(401, 403, 413, 422, 503),
        openapi_extra=json_body("EnrolRequest"),
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
        responses=error_responses(401, 403, 404, 422, 503),
        openapi_extra={
            "security": BEARER,
            "parameters": [
                *path_params("job", "device_id"),
                wait_param(service.tuning.long_poll_max_seconds),
            ],
        },
        summary="Ask for work: a task, retry later, no job, or done",
    )
    async def poll(request: Request) -> Any:
        job, device_id = _ids(request, "job", "device_id")
        claims = service.authenticate(request.headers.get("authorization"), device_id)
        answer = await service.poll(
            job, claims, wait=_wait(request, service.tuning.long_poll_max_seconds)
        )
        metrics.poll_answers.labels(answer=getattr(answer, "reason", answer.status)).inc()
        headers = dict(gateway_header)
        if (retry := getattr(answer, "retry_after_seconds", None)) is not None:
            # whole seconds, rounded up; 0 only after a long poll's hold ran out
            headers["Retry-After"] = str(math.ceil(retry))
        return JSONResponse(answer.model_dump(mode="json"), headers=headers)

    @app.post(
        f"{API_PREFIX}/jobs/{{job}}/wake",
        response_model=WakeAnswer,
        status_code=202,
        responses=error_responses(422),
        openapi_extra={"parameters": path_params("job")},
        summary="Hint that the job's round pointer was just written: waiting polls hear of "
        "it one read later, not a watch period later (for the round flow; no body)",
    )
    async def wake(request: Request) -> Any:
        """No authentication: a nudge only moves the gateway's next read of the job's round
        forward, at most one read per ``watch_min_gap_seconds`` (edge.gateway.watch);
        what the read finds decides everything."""
        (job,) = _ids(request, "job")
        answer = WakeAnswer(job=job, watching=service.watch.nudge(job))
        return JSONResponse(answer.model_dump(mode="json"), status_code=202, headers=gateway_header)

    @app.get(
        f"{API_PREFIX}/jobs/{{job}}/devices/{{device_id}}/tasks/{{task_id}}/model",
        responses={
            200: {"content": {"application/octet-stream": {}}, "description": "The artifact."},
            206: {"content": {"application/octet-stream": {}}, "description": "A byte range."},
            **error_responses(401, 403, 404, 409, 416, 422, 503),
        },
        response_class=Response,
        openapi_extra={
            "security": BEARER,
            "parameters": [*path_params("job", "device_id", "task_id"), FORMAT_PARAM, RANGE_HEADER],
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
        UPLOAD_TEMPLATE,
        response_model=UploadReceipt,
        responses=error_responses(401, 403, 409, 413, 415, 422, 503),
        openapi_extra={
            **binary_body(settings.max_body_bytes),
            "security": BEARER,
            "parameters": [*path_params(*UPLOAD_PARAMS), *UPLOAD_HEADERS],
        },
        summary="Upload the update (new - old) as safetensors, or an evaluation's metrics as JSON",
    )
    async def upload(request: Request) -> Any:
        """Served by ``UploadRoute`` before FastAPI sees it; here for the OpenAPI document
        and for apps mounted under a root path."""
        ids = [str(request.path_params[name]) for name in UPLOAD_PARAMS]
        receipt = await uploads.receipt(ids, request.headers, request.stream())
        return JSONResponse(receipt.model_dump(mode="json"), headers=gateway_header)

    uploads.route = next(r for r in app.routes if getattr(r, "path", None) == UPLOAD_TEMPLATE)

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> Health:
        return Health(gateway_id=service.gateway_id, pending_updates=service.committer.pending)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    install_openapi(app)
    return app


def _short(exc: Exception) -> str:
    text = str(exc).replace("\n", "; ")
    return text[:500]
