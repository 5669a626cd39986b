"""Servers that ``benchmarks/gateway.py`` runs as subprocesses beside the real gateway.

``floor``: the lower bound of a durably acknowledging upload endpoint on this
stack. A bare ASGI app (no FastAPI, no checks, no tokens, no metrics) under the
same uvicorn (uvloop + httptools) that reads each upload's body, puts it in a
batch, writes each batch with ONE boto3 PUT, re-reads one small object with ONE
uncached GET (the cost of the close fence), and only then answers every upload
of the batch with a small JSON receipt. Batches are cut like the gateway's:
per leaf lane (4 lanes, by device id), at ``--max-updates`` or ``--max-wait-ms``
after the first update, and a lane's next batch waits while its previous write
is in flight. Whatever the gateway spends above this floor per upload is what
its request path, checks and bookkeeping cost.

``gateway``: the real gateway (``edge.gateway.server.serve``) with a cProfile
switch for the event loop thread: SIGUSR1 starts profiling, SIGUSR2 stops it
and writes ``--profile``, so only the phase of interest is profiled.

    python benchmarks/gateway_servers.py floor --port 9100 --endpoint http://127.0.0.1:9000 \
        --bucket b --max-updates 64 --max-wait-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import signal
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import uvicorn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

LANES = 4  # the benchmark's round has 4 leaves
FENCE_KEY = "floor/fence.json"


class FloorApp:
    """Read the body, group-commit with one PUT and one GET per batch, then answer."""

    def __init__(self, endpoint: str, bucket: str, max_updates: int, max_wait: float) -> None:
        self.s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        )
        self.bucket = bucket
        self.max_updates = max_updates
        self.max_wait = max_wait
        self.pool = ThreadPoolExecutor(16)
        self.open: dict[int, list[tuple[bytes, asyncio.Future[None]]]] = {}
        self.writing: dict[int, bool] = {}
        self.due: dict[int, bool] = {}
        self.seq = 0
        self.puts = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.s3.put_object(Bucket=bucket, Key=FENCE_KEY, Body=b'{"status":"open"}')

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/healthz":
            await self._answer(send, b'{"status":"ok","puts":%d}' % self.puts)
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        lane = zlib.crc32(scope["path"].encode()) % LANES
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch = self.open.setdefault(lane, [])
        batch.append((b"".join(chunks), future))
        if len(batch) == 1:
            asyncio.get_running_loop().call_later(self.max_wait, self._timer, lane, batch)
        if len(batch) >= self.max_updates:
            self._flush(lane)
        await future
        await self._answer(send, b'{"duplicate":false}')

    @staticmethod
    async def _answer(send: Send, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _timer(self, lane: int, batch: list[tuple[bytes, asyncio.Future[None]]]) -> None:
        if self.open.get(lane) is not batch:
            return
        if self.writing.get(lane):
            self.due[lane] = True
        else:
            self._flush(lane)

    def _flush(self, lane: int) -> None:
        batch = self.open.pop(lane, None)
        if batch:
            self.writing[lane] = True
            self.due[lane] = False
            task = asyncio.ensure_future(self._write(lane, batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _write(self, lane: int, batch: list[tuple[bytes, asyncio.Future[None]]]) -> None:
        loop = asyncio.get_running_loop()
        self.seq += 1
        key = f"floor/{lane}/{self.seq:08d}-{uuid.uuid4().hex[:6]}"
        data = b"".join(body for body, _ in batch)
        await loop.run_in_executor(
            self.pool, lambda: self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        )
        await loop.run_in_executor(
            self.pool, lambda: self.s3.get_object(Bucket=self.bucket, Key=FENCE_KEY)["Body"].read()
        )
        self.puts += 1
        for _, future in batch:
            future.set_result(None)
        self.writing[lane] = False
        if self.due.get(lane) and lane in self.open:
            self._flush(lane)


def serve_floor(args: argparse.Namespace) -> None:
    app = FloorApp(args.endpoint, args.bucket, args.max_updates, args.max_wait_ms / 1000)
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, backlog=4096
    )


def serve_gateway(args: argparse.Namespace) -> None:
    from edge.gateway.server import serve
    from infra.settings import GatewaySettings, S3Settings

    profiler = cProfile.Profile(time.thread_time)  # CPU time of the loop thread, not wall
    if args.profile:
        signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())

        def stop(*_: object) -> None:
            profiler.disable()
            profiler.dump_stats(args.profile)

        signal.signal(signal.SIGUSR2, stop)
    serve(
        host="127.0.0.1",
        port=args.port,
        gateway_settings=GatewaySettings(),
        s3_settings=S3Settings(),
        gateway_id=args.gateway_id,
        log_level="warning",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="server", required=True)
    floor = sub.add_parser("floor")
    floor.add_argument("--port", type=int, required=True)
    floor.add_argument("--endpoint", required=True)
    floor.add_argument("--bucket", required=True)
    floor.add_argument("--max-updates", type=int, default=64)
    floor.add_argument("--max-wait-ms", type=float, default=50)
    gateway = sub.add_parser("gateway")
    gateway.add_argument("--port", type=int, required=True)
    gateway.add_argument("--gateway-id", required=True)
    gateway.add_argument("--profile", default=None, help="cProfile output (SIGUSR1/SIGUSR2)")
    args = parser.parse_args()
    (serve_floor if args.server == "floor" else serve_gateway)(args)


if __name__ == "__main__":
    main()
