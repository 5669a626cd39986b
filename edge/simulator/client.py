"""A device's side of the protocol over httpx, as a phone app would implement it.

Only the public HTTP surface is used: enrol (challenge, signature with the
device's own key, enrolment), poll, download, upload (an update, or an
evaluation task's metrics). A device
has a home gateway (its index modulo the number of gateways) and fails over to
the next one when its gateway stops answering; routing makes that safe, since
every gateway gives a device the same leaf and task.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from pydantic import TypeAdapter, ValidationError

from edge.protocol import (
    HEADER_METRICS,
    HEADER_MODEL_VERSION,
    HEADER_NUM_SAMPLES,
    DoneAnswer,
    EvaluationResult,
    NoJobAnswer,
    PollAnswer,
    RetryAnswer,
    TaskAnswer,
    TaskOffer,
    UploadReceipt,
    challenge_path,
    enrol_path,
    task_path,
)
from edge.simulator.identity import DeviceKey

_POLL_ANSWER: TypeAdapter[TaskAnswer | RetryAnswer | NoJobAnswer | DoneAnswer] = TypeAdapter(
    PollAnswer
)


class TransportFailure(Exception):
    """No gateway answered (connection refused, reset, timeout)."""


# 4xx answers that mean "not now" rather than "never": throttling and timeouts.
TRANSIENT_STATUSES = frozenset({408, 425, 429})
# Refusals that only mean the round moved on under the device: it polls again.
ROUND_MOVED_ON = frozenset({"task_not_current", "not_selected", "late"})


class ErrorAnswer(Exception):
    """A gateway answered with an error body (``operation``: what the device was doing)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: float | None = None,
        operation: str = "request",
    ):
        super().__init__(f"{operation}: HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.operation = operation

    @property
    def permanent(self) -> bool:
        """Asking again cannot help: a 4xx that is neither throttling nor a round change.

        Tokens that expired are renewed before an answer gets here (``_authorised``),
        so a 401 or 404 that still arrives is a configuration problem too.
        """
        return (
            400 <= self.status < 500
            and self.status not in TRANSIENT_STATUSES
            and self.code not in ROUND_MOVED_ON
        )


@dataclass(frozen=True)
class UploadOutcome:
    """What became of an upload: accepted (maybe duplicate) or refused with a code."""

    status: int
    code: str  # "accepted", "duplicate", or the error code
    retry_after: float | None = None


# Connections one ``httpx.AsyncClient`` holds at most. httpcore's pool walks all its
# connections for every queued request whenever a request starts or ends (and, for
# each idle one, all of them again), so a pool's bookkeeping grows with the square of
# its size: 5,000 phones enrolling through pools of ~120 connections kept a simulator
# busy for minutes before its first request left. Many small pools keep that walk short.
POOL_SLICE = 16


class GatewayPool:
    """Keep-alive ``httpx.AsyncClient``s per gateway URL, shared by every device.

    ``max_connections`` per gateway are split over ``ceil(max_connections /
    POOL_SLICE)`` clients; a device always uses the same one (its ``slot``).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        verify: str | bool = True,
        max_connections: int = 256,
        timeout: float = 60.0,
    ) -> None:
        if not urls:
            raise ValueError("at least one gateway URL is needed")
        slices = -(-max_connections // POOL_SLICE)
        per_slice = -(-max_connections // slices)
        limits = httpx.Limits(max_connections=per_slice, max_keepalive_connections=per_slice)
        # one TLS context for every client: building one loads the CA bundle (~50 ms)
        tls = httpx.create_ssl_context(verify=verify) if verify is not False else False
        self.urls = list(urls)
        self._clients = [
            [
                httpx.AsyncClient(
                    base_url=url,
                    verify=tls,
                    limits=limits,
                    timeout=httpx.Timeout(timeout, connect=10.0, pool=None),
                )
                for _ in range(slices)
            ]
            for url in self.urls
        ]

    def __len__(self) -> int:
        return len(self._clients)

    def client(self, index: int, slot: int = 0) -> httpx.AsyncClient:
        """Gateway ``index`` (modulo their number), through its ``slot``-th client."""
        clients = self._clients[index % len(self._clients)]
        return clients[slot % len(clients)]

    async def aclose(self) -> None:
        for clients in self._clients:
            for client in clients:
                await client.aclose()


def _error(response: httpx.Response, operation: str = "request") -> ErrorAnswer:
    try:
        body = response.json()
        code, message = str(body.get("code", "unknown")), str(body.get("message", ""))
        retry = body.get("retry_after_seconds")
    except (ValueError, AttributeError):
        code, message, retry = "unknown", response.text[:200], None
    retry_after = float(retry) if isinstance(retry, int | float) and retry else None
    return ErrorAnswer(response.status_code, code, message, retry_after, operation)


class DeviceClient:
    """The protocol calls of one device, with token handling and gateway failover."""

    def __init__(
        self,
        pool: GatewayPool,
        *,
        device_id: str,
        home: int,
        job: str,
        runtimes: Sequence[str],
        enrolment_secret: str,
        key: DeviceKey | None = None,
    ) -> None:
        self.pool = pool
        self.device_id = device_id
        self.key = key or DeviceKey.derive(device_id)
        self.gateway = home
        self.slot = home // len(pool)  # devices of one home gateway spread over its clients
        self.job = job
        self.runtimes = list(runtimes)
        self._secret = enrolment_secret
        self._token: str | None = None
        self.failovers = 0

    @property
    def enrolled(self) -> bool:
        return self._token is not None

    async def _request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        """Send to the current gateway; on a transport error try each other gateway once."""
        last: Exception | None = None
        for _ in range(len(self.pool)):
            try:
                return await self.pool.client(self.gateway, self.slot).request(
                    method, url, **kwargs
                )  # type: ignore[arg-type]
            except httpx.TransportError as exc:
                last = exc
                self.gateway += 1
                self.failovers += 1
        raise TransportFailure(f"no gateway answered {method} {url}: {last}")

    async def enrol(self) -> None:
        """Ask for a challenge, sign it with the device's key, enrol (see protocol.md, 1)."""
        asked = await self._request("POST", challenge_path(), json={"device_id": self.device_id})
        if asked.status_code != 200:
            raise _error(asked, "enrolment challenge")
        challenge = str(asked.json()["challenge"])
        response = await self._request(
            "POST",
            enrol_path(),
            json={
                "device_id": self.device_id,
                "enrolment_secret": self._secret,
                "jobs": [self.job],
                "runtimes": self.runtimes,
                "platform": "canopy-simulator",
                "public_key": self.key.public_key,
                "challenge": challenge,
                "signature": self.key.sign(self.device_id, challenge),
            },
        )
        if response.status_code != 200:
            raise _error(response, "enrolment")
        self._token = response.json()["token"]

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    async def _authorised(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        """A call that re-enrols once when the token has expired or the registry forgot us."""
        if self._token is None:
            await self.enrol()
        headers = dict(kwargs.pop("headers", {}) or {})  # type: ignore[call-overload]
        response = await self._request(method, url, headers={**headers, **self._auth()}, **kwargs)
        if response.status_code == 401 or (
            response.status_code == 404 and _error(response).code == "unknown_device"
        ):
            await self.enrol()
            response = await self._request(
                method, url, headers={**headers, **self._auth()}, **kwargs
            )
        return response

    async def poll(
        self, *, wait: float = 0.0
    ) -> TaskAnswer | RetryAnswer | NoJobAnswer | DoneAnswer:
        """Ask for work; ``wait`` > 0 lets the gateway hold the answer (a long poll)."""
        params = {"wait": f"{wait:g}"} if wait > 0 else None
        response = await self._authorised("GET", task_path(self.job, self.device_id), params=params)
        if response.status_code != 200:
            raise _error(response, "poll")
        try:
            return _POLL_ANSWER.validate_json(response.content)
        except ValidationError as exc:
            raise ErrorAnswer(200, "unreadable_answer", str(exc)[:200], None, "poll") from exc

    async def download(self, url: str, sha256: str) -> bytes:
        """The artifact at ``url``, refused unless its bytes hash to ``sha256``."""
        response = await self._authorised("GET", url)
        if response.status_code != 200:
            raise _error(response, "download")
        data = response.content
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ErrorAnswer(
                200, "corrupt_download", f"{url} does not match its sha256", None, "download"
            )
        return data

    async def upload(
        self, offer: TaskOffer, update: bytes, *, num_samples: int, metrics: dict[str, float]
    ) -> UploadOutcome:
        response = await self._authorised(
            "POST",
            offer.upload_url,
            content=update,
            headers={
                "Content-Type": "application/octet-stream",
                HEADER_MODEL_VERSION: offer.model_version,
                HEADER_NUM_SAMPLES: str(num_samples),
                HEADER_METRICS: json.dumps(metrics),
            },
        )
        return _outcome(response)

    async def upload_evaluation(
        self, offer: TaskOffer, *, num_samples: int, metrics: dict[str, float]
    ) -> UploadOutcome:
        """An evaluation task's result: the metrics as JSON, no update (docs/protocol.md, 4)."""
        response = await self._authorised(
            "POST",
            offer.upload_url,
            content=EvaluationResult(metrics=metrics).model_dump_json(),
            headers={
                "Content-Type": "application/json",
                HEADER_MODEL_VERSION: offer.model_version,
                HEADER_NUM_SAMPLES: str(num_samples),
            },
        )
        return _outcome(response)


def _outcome(response: httpx.Response) -> UploadOutcome:
    if response.status_code == 200:
        receipt = UploadReceipt.model_validate_json(response.content)
        return UploadOutcome(200, "duplicate" if receipt.duplicate else "accepted")
    error = _error(response, "upload")
    return UploadOutcome(error.status, error.code, error.retry_after)
