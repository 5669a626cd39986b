"""Reading request bodies with limits: per request (413) and for the whole gateway (503).

A device may declare a huge ``Content-Length`` or stream without one; either
way the gateway stops reading as soon as the limit is passed, instead of
buffering first and checking after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request

from edge.protocol import ErrorCode, ProtocolError


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
    """Read a request's body, refusing with 413 as soon as it passes ``limit`` bytes.

    The bytes read are taken from ``budget``; the caller gives back ``len(body)``
    when done with it (on failure here, this function gives them back itself).
    """
    return await read_chunks(request.headers.get("content-length"), request.stream(), limit, budget)


async def read_chunks(
    declared: str | None, chunks: AsyncIterator[bytes], limit: int, budget: BodyBudget
) -> bytes:
    """``read_body`` for any source of body chunks (the raw ASGI upload route reads
    ``receive`` itself); ``declared`` is the ``Content-Length`` header, if any."""
    if (
        declared is not None
        and declared.strip().isascii()
        and declared.strip().isdigit()
        and int(declared) > limit
    ):
        raise too_large(limit)
    parts: list[bytes] = []
    total = 0
    try:
        async for chunk in chunks:
            if total + len(chunk) > limit:
                raise too_large(limit)
            budget.take(len(chunk))
            total += len(chunk)
            parts.append(chunk)
    except BaseException:
        budget.give(total)
        raise
    return parts[0] if len(parts) == 1 else b"".join(parts)


def too_large(limit: int) -> ProtocolError:
    return ProtocolError(
        413,
        ErrorCode.BODY_TOO_LARGE,
        f"request body is over the gateway's limit of {limit} bytes",
        details={"max_body_bytes": limit},
    )
