"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1, in front of the moto server (or a gateway).

Why it exists: Canopy's durability claims (an acknowledged update is in S3, a
retried PUT is harmless, a flow that lists after closing sees every
acknowledged batch) only mean something when storage misbehaves the way real
S3 and real networks do. Pointing ``CANOPY_S3_ENDPOINT_URL`` (``S3Settings.endpoint_url``)
at this proxy makes every Canopy S3 client (gateways, the flow) go through it;
the proxy forwards each request to the real moto server over HTTP and, for a
seeded fraction of them, misbehaves instead:

``error500`` / ``error503``
    An S3 error answer (``InternalError`` / ``SlowDown`` XML) without forwarding.
``slow``
    The request is forwarded; the answer is held for ``delay_s`` before it is relayed.
``reset``
    The connection is reset mid-request (after half of the body, or after the
    head when there is none): the request never reaches moto.
``drop_response``
    The request is forwarded and applied, then the connection is reset instead
    of answering: the client must retry a request that already happened (this
    is what makes idempotent writes matter).
``truncate``
    The answer's head and half of its body are relayed, then the connection is
    reset (a download cut mid-way).

Faults can be restricted to operations (``GET``, ``PUT``, ``HEAD``, ``LIST``,
``POST``, ``DELETE``) and to paths matching a regex, and capped in number
(``limit``: rate 1.0 with limit 5 is a five-request outage). Every request and
every injected fault is counted by operation and kind.

Bytes are relayed as they are: request and response heads line by line (only
``Expect: 100-continue`` is answered by the proxy itself, which then streams the
body on), bodies with their own framing (``Content-Length`` or chunked, so
aws-chunked uploads pass untouched) in pieces as they arrive. Each request
gets its own upstream connection, so an idle keep-alive connection closed by
moto can never look like an injected fault. The same class with no faults and
an ``observer`` is a wire tap: the fault tests put one in front of each gateway
to record every receipt a device was sent.

Only loopback upstreams are accepted, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from tests.support.service import Service

FaultKind = Literal["error500", "error503", "slow", "reset", "drop_response", "truncate"]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "error500",
    "error503",
    "slow",
    "reset",
    "drop_response",
    "truncate",
)
# What "S3 faults" means when a test does not say: errors, slowness, resets and cut
# downloads, all of which Canopy's S3 client retries (botocore retries requests;
# ``S3ObjectStore.get`` retries a GET whose body is cut: see docs/reliability.md).
DEFAULT_MIX: Mapping[FaultKind, float] = {
    "error500": 1.0,
    "error503": 1.0,
    "slow": 1.0,
    "reset": 0.5,
    "drop_response": 0.5,
    "truncate": 0.5,
}
OPERATIONS = ("GET", "PUT", "HEAD", "LIST", "POST", "DELETE")

_MAX_HEAD = 256 * 1024
_PIECE = 64 * 1024
_IDLE_S = 75.0  # a client keep-alive connection idle this long is closed
_UPSTREAM_S = 120.0  # longest wait for any upstream read or connect
_CAPTURE = 64 * 1024  # response bytes an observer sees at most
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}

_S3_ERRORS = {
    "error500": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error.",
    ),
    "error503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
}


@dataclass(frozen=True)
class FaultPlan:
    """Which requests misbehave, and how; the RNG is seeded so a run can be replayed.

    ``rate`` is the fraction of matching requests that get a fault; ``kinds``
    weighs the kinds against each other; ``ops`` and ``path`` (a regex searched
    in the request path) select the requests that may be faulted; ``limit``
    caps the number of faults (None: no cap).
    """

    rate: float = 0.0
    kinds: Mapping[FaultKind, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    ops: frozenset[str] | None = None
    path: str | None = None
    delay_s: float = 0.5
    limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {self.rate}")
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown or not any(w > 0 for w in self.kinds.values()):
            raise ValueError(f"kinds must weigh some of {FAULT_KINDS}, got {dict(self.kinds)}")
        if self.ops is not None and not set(self.ops) <= set(OPERATIONS):
            raise ValueError(f"ops must be among {OPERATIONS}, got {sorted(self.ops)}")
        if self.delay_s < 0 or self.delay_s > _UPSTREAM_S:
            raise ValueError(f"delay_s must be within [0, {_UPSTREAM_S}], got {self.delay_s}")

    @classmethod
    def none(cls) -> FaultPlan:
        return cls(rate=0.0)


@dataclass(frozen=True)
class Exchange:
    """One request and the answer relayed for it (what an observer is shown)."""

    method: str
    target: str
    status: int
    request_headers: Mapping[str, str]
    body: bytes  # at most the first 64 KiB of the response body


@dataclass(frozen=True)
class ProxyStats:
    """Counts so far: requests by operation, injected faults by (operation, kind)."""

    requests: Counter[str]
    injected: Counter[tuple[str, str]]
    upstream_errors: int

    @property
    def requests_total(self) -> int:
        return sum(self.requests.values())

    @property
    def injected_total(self) -> int:
        return sum(self.injected.values())

    def by_kind(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (_, kind), n in self.injected.items():
            out[kind] += n
        return out


class _Reset(Exception):
    """Tear the client connection down with a TCP RST."""


@dataclass
class _Head:
    first: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    def encode(self, *, drop: frozenset[str] = frozenset()) -> bytes:
        lines = [self.first] + [f"{k}: {v}" for k, v in self.headers if k.lower() not in drop]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @property
    def chunked(self) -> bool:
        return "chunked" in (self.get("transfer-encoding") or "").lower()

    @property
    def length(self) -> int | None:
        raw = self.get("content-length")
        if raw is None:
            return None
        value = int(raw.strip())
        if value < 0:
            raise ValueError(f"negative Content-Length {raw!r}")
        return value

    def closes(self) -> bool:
        return "close" in (self.get("connection") or "").lower()


async def _read_head(reader: asyncio.StreamReader, timeout: float) -> _Head | None:
    """The next message head, or None when the peer closed between messages."""
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _Reset from exc
        return None
    except (asyncio.LimitOverrunError, TimeoutError) as exc:
        raise _Reset from exc
    lines = raw[:-4].decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise _Reset
        headers.append((name.strip(), value.strip()))
    return _Head(lines[0], headers)


async def _relay_body(
    head: _Head,
    reader: asyncio.StreamReader,
    send: Callable[[bytes], Awaitable[None]] | None,
    *,
    until_eof: bool = False,
    stop_after: int | None = None,
    capture: bytearray | None = None,
) -> int:
    """Copy one body with its framing from ``reader`` to ``send``; return payload bytes.

    ``stop_after`` raises ``_Reset`` once that many payload bytes were relayed
    (a cut-off transfer); ``capture`` keeps the first payload bytes.
    """
    relayed = 0

    async def copy(data: bytes, payload: bytes) -> None:
        nonlocal relayed
        if stop_after is not None and relayed + len(payload) >= stop_after:
            keep = max(0, stop_after - relayed)
            if send is not None and keep:
                await send(payload[:keep])
            raise _Reset
        relayed += len(payload)
        if capture is not None and len(capture) < _CAPTURE:
            capture.extend(payload[: _CAPTURE - len(capture)])
        if send is not None:
            await send(data)

    async def read_exactly(n: int) -> bytes:
        return await asyncio.wait_for(reader.readexactly(n), _UPSTREAM_S)

    if head.chunked:
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), _UPSTREAM_S)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                trailer = line
                while True:  # trailers, then the empty line
                    extra = await asyncio.wait_for(reader.readuntil(b"\r\n"), _UPSTREAM_S)
                    trailer += extra
                    if extra == b"\r\n":
                        break
                if send is not None:
                    await send(trailer)
                return relayed
            data = await read_exactly(size + 2)
            await copy(line + data, data[:-2])
    length = head.length
    if length is not None:
        left = length
        while left:
            piece = await asyncio.wait_for(reader.read(min(_PIECE, left)), _UPSTREAM_S)
            if not piece:
                raise _Reset
            left -= len(piece)
            await copy(piece, piece)
        return relayed
    if until_eof:
        while piece := await asyncio.wait_for(reader.read(_PIECE), _UPSTREAM_S):
            await copy(piece, piece)
    return relayed


def _operation(method: str, target: str) -> str:
    """S3's operation classes, path-style: a GET of the bucket itself is a LIST."""
    path = urlsplit(target).path
    parts = [p for p in path.split("/") if p]
    if method == "GET" and len(parts) <= 1:
        return "LIST"
    return method if method in OPERATIONS else "POST"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: what a crashed peer or a broken path looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultyProxy(Service):
    """An HTTP/1.1 proxy in a background thread; ``url`` is where clients point."""

    def __init__(
        self,
        upstream: str,
        plan: FaultPlan | None = None,
        *,
        port: int = 0,
        observer: Callable[[Exchange], None] | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in _LOOPBACK or parts.port is None:
            raise ValueError(f"upstream must be http://127.0.0.1:PORT, got {upstream!r}")
        self.upstream = upstream
        self._up_host, self._up_port = parts.hostname, parts.port
        self._requested_port = port
        self.port = 0
        self.observer = observer
        self._lock = threading.Lock()
        self._plan = plan or FaultPlan.none()
        self._rng = random.Random(self._plan.seed)
        self._faults = 0
        self._requests: Counter[str] = Counter()
        self._injected: Counter[tuple[str, str]] = Counter()
        self._upstream_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="faulty-proxy")

    # ------------------------------------------------------------- control

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def plan(self) -> FaultPlan:
        return self._plan

    def set_plan(self, plan: FaultPlan) -> None:
        """Switch faults on, off or to another mix; the RNG restarts from the plan's seed."""
        with self._lock:
            self._plan = plan
            self._rng = random.Random(plan.seed)
            self._faults = 0

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(
                Counter(self._requests), Counter(self._injected), self._upstream_errors
            )

    def start(self, timeout: float = 10.0) -> FaultyProxy:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("fault proxy did not start")
        if self._failed is not None:
            raise RuntimeError(f"fault proxy did not start: {self._failed}") from self._failed
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)

    # ------------------------------------------------------------- the loop

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(
                    self._serve, "127.0.0.1", self._requested_port, limit=_MAX_HEAD
                )
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as exc:  # reported to start()
            self._failed = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    def _decide(self, op: str, target: str) -> FaultKind | None:
        with self._lock:
            self._requests[op] += 1
            plan = self._plan
            if plan.rate <= 0 or (plan.limit is not None and self._faults >= plan.limit):
                return None
            if plan.ops is not None and op not in plan.ops:
                return None
            if plan.path is not None and not re.search(plan.path, urlsplit(target).path):
                return None
            if self._rng.random() >= plan.rate:
                return None
            kinds = [k for k, w in plan.kinds.items() if w > 0]
            kind = self._rng.choices(kinds, weights=[plan.kinds[k] for k in kinds])[0]
            self._faults += 1
            self._injected[(op, kind)] += 1
            return kind

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while await self._one_exchange(reader, writer):
                pass
        except _Reset:
            _reset(writer)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
            _reset(writer)
        except asyncio.CancelledError:
            # stop(): end the connection quietly. Re-raising would make asyncio's
            # stream callback log a "cancelled" handler task for every open connection.
            _reset(writer)
        else:
            with contextlib.suppress(OSError):
                writer.close()
        finally:
            self._conns.discard(task)

    async def _one_exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Relay one request and its answer (or misbehave); False when the connection ends."""
        head = await _read_head(reader, _IDLE_S)
        if head is None:
            return False
        method, target = head.first.split(" ", 2)[:2]
        if (head.get("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        has_body = head.chunked or (head.length or 0) > 0
        fault = self._decide(_operation(method, target), target)

        if fault in _S3_ERRORS:
            await _relay_body(head, reader, None)  # read and discard: the framing stays intact
            self._answer_error(writer, method, fault)
            await writer.drain()
            return not head.closes()
        if fault == "reset":
            if has_body:
                half = max(1, (head.length or 2) // 2)
                with contextlib.suppress(_Reset):
                    await _relay_body(head, reader, None, stop_after=half)
            raise _Reset

        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self._up_host, self._up_port, limit=_MAX_HEAD), _UPSTREAM_S
            )
        except (OSError, TimeoutError) as exc:
            with self._lock:
                self._upstream_errors += 1
            raise _Reset from exc  # like the service itself being down
        try:
            return await self._forward(head, method, fault, reader, writer, up_reader, up_writer)
        finally:
            up_writer.transport.abort()

    async def _forward(
        self,
        head: _Head,
        method: str,
        fault: FaultKind | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> bool:
        async def to_upstream(data: bytes) -> None:
            up_writer.write(data)
            await up_writer.drain()

        async def to_client(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        try:
            up_writer.write(head.encode(drop=frozenset({"expect"})))
            await _relay_body(head, reader, to_upstream)
            await up_writer.drain()
            while True:  # skip interim answers; the proxy already said 100 Continue
                answer = await _read_head(up_reader, _UPSTREAM_S)
                if answer is None:
                    raise _Reset
                status = int(answer.first.split(" ", 2)[1])
                if status >= 200:
                    break
        except (_Reset, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            with self._lock:
                self._upstream_errors += 1
            raise _Reset from exc

        bodiless = method == "HEAD" or status in (204, 304)
        if fault == "drop_response":
            if not bodiless:
                await _relay_body(answer, up_reader, None, until_eof=True)
            raise _Reset
        if fault == "slow":
            await asyncio.sleep(self._plan.delay_s)
        capture = bytearray() if self.observer is not None else None
        writer.write(answer.encode())
        if not bodiless:
            cut = None
            if fault == "truncate":
                cut = max(1, (answer.length or 2) // 2)
            await _relay_body(
                answer,
                up_reader,
                to_client,
                until_eof=not answer.chunked and answer.length is None,
                stop_after=cut,
                capture=capture,
            )
        elif fault == "truncate":
            raise _Reset
        await writer.drain()
        if self.observer is not None:
            request_headers = {k.lower(): v for k, v in head.headers}
            self.observer(
                Exchange(
                    method, head.first.split(" ")[1], status, request_headers, bytes(capture or b"")
                )
            )
        framed = bodiless or answer.chunked or answer.length is not None
        return framed and not head.closes() and not answer.closes()

    def _answer_error(self, writer: asyncio.StreamWriter, method: str, fault: str) -> None:
        status, reason, code, message = _S3_ERRORS[fault]
        with self._lock:
            request_id = f"canopy-fault-{self._faults}"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        lines = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/xml",
            f"Content-Length: {0 if method == 'HEAD' else len(body)}",
            f"x-amz-request-id: {request_id}",
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        if method != "HEAD":
            writer.write(body)


FaultyS3Proxy = FaultyProxy
"""The name the fault tests use when the proxy stands in front of S3."""
