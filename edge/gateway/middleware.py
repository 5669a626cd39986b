"""ASGI middleware: request latency, bytes in and out, and an early 413.

Written against raw ASGI rather than Starlette's ``BaseHTTPMiddleware`` so it
adds microseconds, not a task per request, and so it sees every body chunk.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.gateway.metrics import GatewayMetrics
from edge.protocol import ErrorCode


class ObservabilityMiddleware:
    """Time each request by route template; refuse declared bodies over the limit."""

    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        declared = _content_length(scope)
        try:
            if declared is not None and declared > self.max_body_bytes:
                if scope["path"].endswith("/result"):
                    self.metrics.results_rejected.labels(reason=ErrorCode.BODY_TOO_LARGE).inc()
                await self._too_large(send, declared)
                return
            await self.app(scope, self._counting_receive(receive), self._counting_send(send))
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.request_seconds.labels(route=template, method=scope["method"]).observe(
                time.perf_counter() - started
            )

    def _counting_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.metrics.bytes_in.inc(len(message.get("body", b"")))
            return message

        return wrapped

    def _counting_send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.body":
                self.metrics.bytes_out.inc(len(message.get("body", b"")))
            await send(message)

        return wrapped

    async def _too_large(self, send: Send, declared: int) -> None:
        body = json.dumps(
            {
                "code": ErrorCode.BODY_TOO_LARGE.value,
                "message": (
                    f"request body of {declared} bytes is over the gateway's limit of "
                    f"{self.max_body_bytes} bytes"
                ),
                "tensor": None,
                "details": {"max_body_bytes": self.max_body_bytes},
                "retry_after_seconds": None,
            }
        ).encode()
        self.metrics.errors.labels(status="413", code=ErrorCode.BODY_TOO_LARGE.value).inc()
        headers: list[Any] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isascii() and text.isdigit() else None
    return None
