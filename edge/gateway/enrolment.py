"""Enrolment: who may get a token for a device id, and the registry records it leaves.

A device asks for a challenge, signs it with its key and enrols with the
fleet's enrolment secret, its public key and the signature. The gateway checks
them in that order (secret, challenge, signature), then the binding of the id
to the key (``identities/{device_id}.json``, trust on first use, see
``identity``), and only then writes the per-job registry records (the source
of truth for the device's details), adds the id to the job's registry index
(``registry_index``: shards the flow samples from without listing every
record) and issues the token.

Binding a new id reads, writes and reads the identity back. The store offers no
conditional PUT, so two first enrolments of one new id racing within a few
milliseconds could both be answered; the read-back makes the later writer the
only one whose next enrolment succeeds. A conditional PUT (``If-None-Match: *``,
which S3, MinIO and moto support) would close that window entirely.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from datetime import UTC, datetime

import pydantic

from edge.gateway.cache import TtlCache
from edge.gateway.identity import (
    canonical_public_key,
    challenge_key,
    issue_challenge,
    verify_challenge,
    verify_proof,
)
from edge.gateway.metrics import GatewayMetrics
from edge.gateway.registry_index import IndexWriter
from edge.gateway.rounds import RoundDirectory, StoreCalls, unavailable
from edge.gateway.tokens import issue_token
from edge.gateway.tuning import GatewayTuning
from edge.manifests import (
    KIND_DEVICE_IDENTITY,
    KIND_DEVICE_RECORD,
    DeviceIdentity,
    DeviceRecord,
    device_key,
    identity_key,
)
from edge.protocol import (
    CHALLENGE_TTL_SECONDS,
    ChallengeRequest,
    ChallengeResponse,
    EnrolRequest,
    EnrolResponse,
    ErrorCode,
    ProtocolError,
)
from infra.errors import ObjectNotFoundError
from infra.settings import GatewaySettings
from infra.store import get_json, put_json


class EnrolmentDesk:
    """Challenges, proofs, identity bindings, registry records and tokens."""

    def __init__(
        self,
        settings: GatewaySettings,
        calls: StoreCalls,
        rounds: RoundDirectory,
        metrics: GatewayMetrics,
        *,
        gateway_id: str,
        tuning: GatewayTuning,
    ) -> None:
        self._settings = settings
        self._calls = calls
        self._rounds = rounds
        self._metrics = metrics
        self._gateway_id = gateway_id
        self.index = IndexWriter(calls, gateway_id=gateway_id)
        self._token_secret = settings.token_secret.get_secret_value().encode()
        self._challenge_key = challenge_key(self._token_secret)
        self._enrolment_secret = settings.enrolment_secret.get_secret_value().encode()
        # A binding never changes under a gateway (only an operator deletes one), so a
        # known key is trusted for as long as a registry entry; an unknown id is never cached.
        self._keys: TtlCache[str, str | None] = TtlCache(
            lambda key: tuning.registry_cache_seconds if key is not None else -1.0,
            max_entries=200_000,
        )

    def challenge(self, request: ChallengeRequest) -> ChallengeResponse:
        """A fresh challenge for the device id (no I/O: any gateway can verify it)."""
        challenge, expires = issue_challenge(
            self._challenge_key, request.device_id, now=int(time.time()), ttl=CHALLENGE_TTL_SECONDS
        )
        return ChallengeResponse(
            device_id=request.device_id,
            challenge=challenge,
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    async def enrol(self, request: EnrolRequest) -> EnrolResponse:
        """Check secret, challenge and signature; bind or match the key; register; token."""
        if not secrets.compare_digest(request.enrolment_secret.encode(), self._enrolment_secret):
            raise ProtocolError(401, ErrorCode.BAD_ENROLMENT_SECRET, "enrolment secret is wrong")
        now = datetime.now(UTC)
        verify_challenge(
            self._challenge_key, request.challenge, request.device_id, now=int(now.timestamp())
        )
        verify_proof(request.public_key, request.signature, request.device_id, request.challenge)
        await self._bind(request.device_id, canonical_public_key(request.public_key), now)
        runtimes = sorted(set(request.runtimes))
        jobs = sorted(set(request.jobs))
        for job in jobs:
            record = DeviceRecord(
                device_id=request.device_id,
                job=job,
                runtimes=runtimes,
                platform=request.platform,
                app_version=request.app_version,
                enrolled_at=now,
                gateway_id=self._gateway_id,
            )
            key = device_key(job, request.device_id)
            await self._calls.run(
                functools.partial(put_json, self._calls.store, key, record, kind=KIND_DEVICE_RECORD)
            )
            self._rounds.remember_enrolled(job, request.device_id)
        # The record first, then the index: an indexed id always has its record.
        await asyncio.gather(*(self.index.add(job, request.device_id) for job in jobs))
        token, expires = issue_token(
            self._token_secret,
            request.device_id,
            tuple(runtimes),
            now=int(now.timestamp()),
            ttl=self._settings.token_ttl_seconds,
        )
        self._metrics.enrolments.inc()
        return EnrolResponse(
            device_id=request.device_id,
            token=token,
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    async def _bind(self, device_id: str, public_key: str, now: datetime) -> None:
        """Trust on first use: bind a new id to ``public_key``; a known id must match it."""
        bound = await self._keys.get(device_id, functools.partial(self._read, device_id))
        if bound is None:
            identity = DeviceIdentity(
                device_id=device_id,
                public_key=public_key,
                bound_at=now,
                gateway_id=self._gateway_id,
            )
            key = identity_key(device_id)
            await self._calls.run(
                functools.partial(
                    put_json, self._calls.store, key, identity, kind=KIND_DEVICE_IDENTITY
                )
            )
            bound = await self._read(device_id)  # the last writer of a racing pair wins
            self._keys.put(device_id, bound)
        if bound != public_key:
            self._metrics.identity_mismatches.inc()
            raise ProtocolError(
                403,
                ErrorCode.DEVICE_KEY_MISMATCH,
                f"device id {device_id!r} is bound to another key; a device that lost its key "
                "needs an operator to reset its identity",
            )

    async def _read(self, device_id: str) -> str | None:
        """The public key ``device_id`` is bound to in S3, or None for a new id."""
        key = identity_key(device_id)
        try:
            payload = await self._calls.run(get_json, self._calls.store, key)
        except ObjectNotFoundError:
            return None
        try:
            return DeviceIdentity.model_validate(payload).public_key
        except pydantic.ValidationError as exc:
            raise unavailable("the device's identity record is unreadable", 30.0) from exc
