"""Prefect's own server app, with SQLite lock contention retried inside the server.

On SQLite, Prefect's API answers a write that lost a lock race (``database is
locked``, a stale WAL snapshot) with 503, and Prefect's client waits a fixed
2 s (``2 ** 1``) before trying again. A round makes about forty API calls;
one such 503 on the path to the next subflow costs more than all the others
together (benchmarks/round_speed.py shows where). The failed transaction was
rolled back, so the same request can simply run again a few milliseconds
later: ``RetryLockedRequests`` does that inside the server, where the lock is,
and only a request still refused after its bounded retries reaches the client,
with a short ``Retry-After`` the client honours instead of its 2 s.

Most such races are between the API's own writes, which start together when a
round creates its level subflows side by side: on SQLite, ``OneWriterAtATime``
queues writing requests inside the server, so they stop failing each other and
each waits only for the writes before it.

Run as ``python -m infra.prefect_app --host H --port P``: the same app and
services as ``prefect server start`` (``create_app(final=True)``), one worker.
Postgres does not raise these errors; the middleware then never retries, and
writes are not queued.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRYABLE_STATUS = 503
# Lock waits on SQLite are short (one transaction); 12 tries span about 1.3 s.
ATTEMPTS = 12
FIRST_DELAY_S = 0.01
MAX_DELAY_S = 0.2
# What the client waits when the server's own retries ran out (it honours Retry-After).
CLIENT_RETRY_AFTER_S = "0.1"
# Prefect's API bodies are small JSON; larger ones (none seen) pass through unretried.
MAX_BUFFERED_BODY = 4 * 1024 * 1024


def retry_delays(
    attempts: int = ATTEMPTS, first: float = FIRST_DELAY_S, cap: float = MAX_DELAY_S
) -> list[float]:
    """The waits between tries: doubling from ``first``, capped at ``cap``."""
    return [min(cap, first * 2**i) for i in range(max(0, attempts - 1))]


class RetryLockedRequests:
    """ASGI middleware: run an HTTP request again while the app answers 503.

    The request body is read once and replayed to each try; a try answered 503
    is swallowed whole (status, headers and body) unless it is the last, which
    goes out with ``Retry-After``. Other statuses stream through untouched.
    """

    def __init__(self, app: ASGIApp, delays: list[float] | None = None) -> None:
        self.app = app
        self.delays = retry_delays() if delays is None else delays
        self.retried = 0  # requests that needed at least one more try (for tests and logs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body, complete = await _read_body(receive)
        if not complete:  # too large or the client left: one plain try
            await self.app(scope, _replay(body, receive, more=not complete), send)
            return
        for number, delay in enumerate(self.delays):
            if not await self._try(scope, _replay(body, receive), send, last=False):
                return
            self.retried += number == 0
            await asyncio.sleep(delay)
        await self._try(scope, _replay(body, receive), send, last=True)

    async def _try(self, scope: Scope, receive: Receive, send: Send, *, last: bool) -> bool:
        """One run of the app; True when its 503 answer was held back for another try."""
        swallow = False

        async def guarded_send(message: Message) -> None:
            nonlocal swallow
            if message["type"] == "http.response.start" and message["status"] == RETRYABLE_STATUS:
                if not last:
                    swallow = True
                    return
                headers = list(message.get("headers", []))
                headers.append((b"retry-after", CLIENT_RETRY_AFTER_S.encode()))
                message = {**message, "headers": headers}
            if swallow:
                return
            await send(message)

        try:
            # a fresh copy each try: routing (Starlette's Mount) rewrites the scope in place
            await self.app(dict(scope), receive, guarded_send)
        except Exception:
            # Starlette's ServerErrorMiddleware sends the exception handler's answer
            # (Prefect's 503) and then re-raises; a held-back answer means "try again".
            if not swallow:
                raise
        return swallow


# POST endpoints of Prefect's API that only read (filters, counts, the UI's queries).
READ_ONLY_POSTS = frozenset({"filter", "count", "paginate", "history", "lateness", "graph"})


def writes_database(method: str, path: str) -> bool:
    """Whether a Prefect API request writes (as far as its method and path tell).

    A read taken for a write only waits its turn; a write taken for a read races
    as before and is retried: either mistake is safe.
    """
    if method in ("PUT", "PATCH", "DELETE"):
        return True
    if method != "POST" or "/ui/" in path:
        return False
    return path.rstrip("/").rsplit("/", 1)[-1] not in READ_ONLY_POSTS


class OneWriterAtATime:
    """ASGI middleware: the API's writing requests run one at a time (SQLite only).

    SQLite has one writer. Prefect begins most write transactions DEFERRED: they
    read, then ask for the write lock, and one that finds another write committed
    since its read fails at once ("database is locked", a stale WAL snapshot;
    SQLite's busy timeout does not apply). Writers that start together, such as a
    round's level subflows being created side by side, then fail each other in
    turn: a subflow's parent task run took up to 10 tries and 1.4 s
    (benchmarks/round_speed.py). Queued in the server instead, each write waits
    only for the ones before it. Prefect's own services (event persister,
    task-run recorder) still write beside the queue; ``RetryLockedRequests``,
    outside this, retries what they make fail, releasing the queue while it waits.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._turn = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not writes_database(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        async with self._turn:
            await self.app(scope, receive, send)


def uses_sqlite(environ: Mapping[str, str]) -> bool:
    """Whether the server's database is SQLite (Prefect's default when none is set)."""
    url = environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or environ.get(
        "PREFECT_SERVER_DATABASE_CONNECTION_URL", ""
    )
    return not url or url.startswith("sqlite")


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body, and whether it was read to its end."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True
        if size > MAX_BUFFERED_BODY:
            return b"".join(chunks), False


def _replay(body: bytes, receive: Receive, *, more: bool = False) -> Receive:
    """A ``receive`` that hands out ``body`` first, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args()
    # Settings that `prefect server start` would set from its flags.
    os.environ.setdefault("PREFECT_SERVER_API_HOST", args.host)
    os.environ.setdefault("PREFECT_SERVER_API_PORT", str(args.port))

    import uvicorn
    from prefect.server.api.server import create_app

    api = create_app(final=True)
    app = RetryLockedRequests(OneWriterAtATime(api) if uses_sqlite(os.environ) else api)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=os.environ.get("PREFECT_SERVER_LOGGING_LEVEL", "warning").lower(),
    )


if __name__ == "__main__":
    main()
