"""A task's blocking body in a worker thread, so the flow's event loop keeps running.

Tasks read and write S3 through boto3, which blocks; the flow runs the leaves,
levels and evaluation of a round concurrently on one event loop. ``in_thread``
turns a blocking function into the coroutine function a Prefect task wraps,
without a second signature to keep in step::

    @task(name="sum-node", cache_policy=NONE)
    @in_thread
    def sum_node(ctx: RunContext, ...) -> ObjectRef: ...

``asyncio.to_thread`` copies the context, so Prefect's run context (loggers,
``current_flow_run_id``) is there in the thread.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def in_thread(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """``fn`` as a coroutine function that runs it in a worker thread (same signature,
    name and docstring, so Prefect sees the task's real parameters)."""

    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.to_thread(fn, *args, **kwargs)

    return run
