"""The server-side retry of Prefect requests that lost an SQLite lock race.

Driven as plain ASGI (no server): an app that answers 503 a given number of
times, then 201, stands in for Prefect's API under lock contention.
"""

from __future__ import annotations

import asyncio
from typing import Any

from infra.prefect_app import (
    OneWriterAtATime,
    RetryLockedRequests,
    retry_delays,
    uses_sqlite,
    writes_database,
)


class LockedApp:
    """Answers 503 for its first ``locked`` calls, then 201 echoing the body."""

    def __init__(self, locked: int) -> None:
        self.locked = locked
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        assert scope["path"] == "/api/flow_runs/", "each try sees the request as it came"
        scope["path"] = "/flow_runs/"  # as Starlette's Mount does, in place
        status = 503 if len(self.bodies) <= self.locked else 201
        body = b"busy" if status == 503 else message["body"]
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})


async def call(app: Any, body: bytes, *, chunks: int = 1) -> list[dict[str, Any]]:
    parts = [body[i::chunks] for i in range(chunks)] if chunks > 1 else [body]
    incoming = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
        for i, p in enumerate(parts)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": "/api/flow_runs/"}, receive, send)
    return sent


async def test_a_locked_request_is_run_again_until_it_succeeds() -> None:
    inner = LockedApp(locked=3)
    app = RetryLockedRequests(inner, delays=[0.0] * 5)

    sent = await call(app, b'{"name": "round-0001"}')

    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [201]
    assert sent[-1]["body"] == b'{"name": "round-0001"}'
    assert inner.bodies == [b'{"name": "round-0001"}'] * 4  # the same body each try
    assert app.retried == 1


async def test_a_body_sent_in_chunks_is_replayed_whole() -> None:
    inner = LockedApp(locked=1)
    app = RetryLockedRequests(inner, delays=[0.0])

    await call(app, b"abcdef", chunks=3)

    assert inner.bodies == [b"adbecf", b"adbecf"]


async def test_when_retries_run_out_the_503_reaches_the_client_with_retry_after() -> None:
    inner = LockedApp(locked=10)
    app = RetryLockedRequests(inner, delays=[0.0, 0.0])

    sent = await call(app, b"{}")

    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [503]  # earlier 503s were held back
    assert (b"retry-after", b"0.1") in starts[0]["headers"]
    assert len(inner.bodies) == 3


async def test_other_answers_pass_through_at_once() -> None:
    inner = LockedApp(locked=0)
    app = RetryLockedRequests(inner, delays=[0.0])

    sent = await call(app, b"x")

    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert len(inner.bodies) == 1 and app.retried == 0


def test_retry_delays_double_and_are_capped() -> None:
    assert retry_delays(5, first=0.01, cap=0.05) == [0.01, 0.02, 0.04, 0.05]
    assert sum(retry_delays()) < 2.0  # less than the client's own single back-off


class LockedThenRaisingApp(LockedApp):
    """Like Starlette's ServerErrorMiddleware: sends the handler's 503, then re-raises."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await super().__call__(scope, receive, send)
        if len(self.bodies) <= self.locked:
            raise RuntimeError("database is locked")


async def test_an_app_that_raises_after_its_503_is_retried_not_crashed() -> None:
    inner = LockedThenRaisingApp(locked=2)
    app = RetryLockedRequests(inner, delays=[0.0] * 3)

    sent = await call(app, b"{}")

    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [201]
    assert len(inner.bodies) == 3


# ---------------------------------------------------------------- one writer at a time


def test_writes_are_told_from_reads_by_method_and_path() -> None:
    assert writes_database("POST", "/api/task_runs/")
    assert writes_database("POST", "/api/flow_runs/abc/set_state")
    assert writes_database("PATCH", "/api/flow_runs/abc")
    assert writes_database("DELETE", "/api/artifacts/abc")
    assert not writes_database("GET", "/api/flow_runs/abc")
    assert not writes_database("POST", "/api/flow_runs/filter")
    assert not writes_database("POST", "/api/task_runs/count")
    assert not writes_database("POST", "/api/ui/flow_runs/history")


class SlowApp:
    """Records how many requests run inside it at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.most = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.inside += 1
        self.most = max(self.most, self.inside)
        await asyncio.sleep(0.01)
        self.inside -= 1
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def _request(app: Any, method: str, path: str) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    await app({"type": "http", "method": method, "path": path}, receive, send)


async def test_writes_wait_their_turn_and_reads_do_not() -> None:
    inner = SlowApp()
    app = OneWriterAtATime(inner)
    await asyncio.gather(*(_request(app, "POST", "/api/task_runs/") for _ in range(5)))
    assert inner.most == 1, "writes ran side by side"
    await asyncio.gather(*(_request(app, "POST", "/api/flow_runs/filter") for _ in range(5)))
    assert inner.most == 5, "reads were queued behind each other"


def test_only_an_sqlite_server_queues_its_writes() -> None:
    assert uses_sqlite({})
    assert uses_sqlite({"PREFECT_API_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:///x.db"})
    assert not uses_sqlite({"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://u:p@h/db"})
