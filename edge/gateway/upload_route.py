"""The upload route served as raw ASGI: a gateway's hot path without the framework's layers.

Uploads are what a gateway does most under load, and each must wait for its
batch's S3 write before it is answered. Behind FastAPI, an upload went through
the exception middleware, the exit-stack middleware, the router's linear match
over every route, a ``Request`` object and the dependency solver before any
gateway code ran, and that cost about as much CPU as everything the gateway
itself does for it (docs/gateway.md, "Throughput"). So ``UploadRoute``, an
ASGI middleware inside ``ObservabilityMiddleware``, answers ``POST
/v1/jobs/{job}/devices/{device_id}/tasks/{task_id}/result`` itself: it matches
the path by splitting it, then runs ``UploadHandler``, which the FastAPI route
runs too, so both give the same answers (receipt or ``ErrorBody``), headers and
metrics. Everything else, including this route's OpenAPI description and any
other method on its path (405 with ``Allow``), stays with FastAPI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from edge.gateway.bodies import BodyBudget, read_chunks
from edge.gateway.errors import error_response
from edge.gateway.metrics import GatewayMetrics
from edge.gateway.service import GatewayService
from edge.protocol import (
    API_PREFIX,
    HEADER_GATEWAY,
    MAX_JSON_BODY_BYTES,
    MAX_TASK_ID_CHARS,
    ErrorCode,
    ProtocolError,
    UploadReceipt,
    parse_upload_headers,
    valid_id,
)
from infra.settings import GatewaySettings

UPLOAD_TEMPLATE = f"{API_PREFIX}/jobs/{{job}}/devices/{{device_id}}/tasks/{{task_id}}/result"
UPLOAD_PARAMS = ("job", "device_id", "task_id")
_SEGMENTS = UPLOAD_TEMPLATE.split("/")
_PARAM_AT = tuple(i for i, part in enumerate(_SEGMENTS) if part.startswith("{"))


def match_upload_path(path: str) -> tuple[str, ...] | None:
    """(job, device_id, task_id) when ``path`` is an upload's, else None.

    The same paths as the router's ``[^/]+`` per parameter: the fixed segments
    equal, each parameter one non-empty segment.
    """
    parts = path.split("/")
    if len(parts) != len(_SEGMENTS):
        return None
    for i, (part, fixed) in enumerate(zip(parts, _SEGMENTS, strict=True)):
        if i in _PARAM_AT:
            if not part:
                return None
        elif part != fixed:
            return None
    return tuple(parts[i] for i in _PARAM_AT)


def check_ids(names: Sequence[str], values: Sequence[str]) -> tuple[str, ...]:
    """Path parameters checked by hand (FastAPI's per-parameter validation is the slow part)."""
    for name, value in zip(names, values, strict=True):
        ok = 0 < len(value) <= MAX_TASK_ID_CHARS if name == "task_id" else valid_id(value)
        if not ok:
            raise ProtocolError(
                422, ErrorCode.BAD_REQUEST, f"path parameter {name} {value[:64]!r} is invalid"
            )
    return tuple(values)


class UploadHandler:
    """One upload from path, headers and body to a receipt: what both routes run."""

    def __init__(
        self,
        service: GatewayService,
        metrics: GatewayMetrics,
        settings: GatewaySettings,
        budget: BodyBudget,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.settings = settings
        self.budget = budget
        self.route: Any = None  # the FastAPI route, named in scope["route"] for the metrics

    async def receipt(
        self, ids: Sequence[str], headers: Mapping[str, str], chunks: AsyncIterator[bytes]
    ) -> UploadReceipt:
        """Cheapest checks first; the body is read only once the round would take it."""
        service = self.service
        try:
            job, device_id, task_id = check_ids(UPLOAD_PARAMS, ids)
            claims = service.authenticate(headers.get("authorization"), device_id)
            parsed = parse_upload_headers(headers)
            view = await service.uploads.admit(job, claims, task_id, parsed)
            train = view.task.kind == "train"
            limit = self.settings.max_body_bytes if train else MAX_JSON_BODY_BYTES
            # From here the leaf's open batch may wait for this upload (group commit).
            with service.uploads.arriving(view) as arrival:
                body = await read_chunks(headers.get("content-length"), chunks, limit, self.budget)
                try:
                    return await service.uploads.accept(view, claims, body, parsed, arrival)
                finally:
                    self.budget.give(len(body))
        except ProtocolError as exc:
            self.metrics.results_rejected.labels(reason=exc.code.value).inc()
            raise


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as ASGI delivers it (what Starlette's ``Request.stream`` does)."""
    while True:
        message = await receive()
        if message["type"] == "http.request":
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


class UploadRoute:
    """ASGI middleware that serves the upload route and passes everything else on."""

    def __init__(self, app: ASGIApp, *, handler: UploadHandler, gateway_id: str) -> None:
        self.app = app
        self.handler = handler
        self._gateway = (HEADER_GATEWAY.lower().encode(), gateway_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ids = (
            match_upload_path(scope["path"])
            if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path")
            else None
        )
        if ids is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.handler.route
        try:
            receipt = await self.handler.receipt(ids, Headers(scope=scope), _body_chunks(receive))
        except ProtocolError as exc:
            await error_response(exc, self.handler.metrics)(scope, receive, send)
            return
        body = receipt.model_dump_json().encode()
        headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
            self._gateway,
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
