"""Waiting for a service to become healthy: one loop for the stack, tests and benchmarks.

Every caller that starts a server (``canopy up``, the test fixtures, the gateway
harness, the benchmarks) needs the same three things: poll a check until it
passes, give up at a deadline with a message that names the service, and stop
early when the process it is waiting for has already died, instead of
polling a corpse until the timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import httpx

from infra.errors import CanopyError

# Errors a check may raise while a service is still starting (connection refused,
# reset, read timeout): they mean "not yet", not "broken".
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (OSError, httpx.HTTPError)


class NotHealthyError(CanopyError, TimeoutError):
    """A service did not pass its health check in time, or exited before it did.

    A ``TimeoutError`` too, so callers that guarded a wait with ``except
    TimeoutError`` keep working.
    """


class Process(Protocol):
    """What the wait needs from a started process: whether it has exited."""

    def poll(self) -> int | None: ...


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    proc: Process | None = None,
    *,
    poll: float = 0.25,
) -> None:
    """Call ``check`` every ``poll`` seconds until it returns True.

    ``check`` raising one of ``TRANSIENT_ERRORS`` counts as "not yet"; the last
    such error is quoted if the wait times out. ``check`` runs at least once,
    even with a zero timeout. Raises ``NotHealthyError`` after ``timeout``
    seconds, or as soon as ``proc`` has exited.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        if proc is not None and (code := proc.poll()) is not None:
            raise NotHealthyError(f"{what} exited with code {code} before it was healthy")
        try:
            if check():
                return
        except TRANSIENT_ERRORS as exc:
            last = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(poll)
    detail = f" (last error: {type(last).__name__}: {last})" if last is not None else ""
    raise NotHealthyError(f"{what} not healthy after {timeout:g}s{detail}")


def wait_http_ok(
    url: str,
    proc: Process | None = None,
    *,
    timeout: float = 120.0,
    poll: float = 0.25,
    verify: str | bool = True,
    what: str | None = None,
) -> None:
    """Wait until ``GET url`` answers 200, through one client (TLS setup is not free)."""
    with httpx.Client(verify=verify, timeout=min(2.0, max(timeout, 0.1))) as client:

        def answers_200() -> bool:
            return client.get(url).status_code == 200

        wait_until(answers_200, timeout, what or url, proc, poll=poll)
