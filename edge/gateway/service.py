"""What a gateway does for a device, independent of HTTP.

The gateway owns no round state: the current task of each leaf comes from the
S3 manifests (cached for ``manifest_cache_seconds``), a device's leaf is
``leaf_for_device`` of its id, and accepted updates go to S3 through the group
committer before the device is acknowledged. Two gateways reading the same
manifests therefore give a device the same answer, and a killed gateway loses
nothing it acknowledged.

The only memory a gateway keeps is a bounded set of recently accepted
(task, device) pairs, so a retried upload that reaches the same gateway is
answered ``duplicate`` instead of being stored twice. A retry that reaches a
different gateway may be stored twice; the leaf aggregation de-duplicates by
device id.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pydantic

from aggregation.guards import UpdateRejected, check_update
from aggregation.tensors import TensorDict, TensorSpec, decode_tensors
from edge.gateway.batcher import GroupCommitter
from edge.gateway.cache import BytesCache, TtlCache
from edge.gateway.metrics import GatewayMetrics
from edge.gateway.tokens import TokenClaims, issue_token, verify_token
from edge.manifests import (
    KIND_DEVICE_RECORD,
    ActiveRound,
    DeviceRecord,
    LeafTask,
    Runtime,
    device_key,
)
from edge.protocol import (
    ArtifactInfo,
    DoneAnswer,
    EnrolRequest,
    EnrolResponse,
    ErrorCode,
    ModelFormat,
    NoJobAnswer,
    ProtocolError,
    RetryAnswer,
    RetryReason,
    TaskAnswer,
    TaskOffer,
    UploadReceipt,
    model_path,
    result_path,
)
from edge.routing import leaf_for_device
from edge.update_batch import BatchContext, DeviceUpdate
from infra.errors import ObjectNotFoundError, ValidationError
from infra.keys import active_job_key, check_segment
from infra.settings import GatewaySettings
from infra.store import ObjectRef, ObjectStore, get_json, put_json

log = logging.getLogger("canopy.gateway")

_GUARD_CODES: Mapping[str, ErrorCode] = {
    "missing-tensor": ErrorCode.TENSOR_NAMES,
    "unknown-tensor": ErrorCode.TENSOR_NAMES,
    "shape": ErrorCode.TENSOR_SHAPE,
    "dtype": ErrorCode.TENSOR_DTYPE,
    "non-finite": ErrorCode.NON_FINITE,
    "bad-weight": ErrorCode.BAD_NUM_SAMPLES,
    "bad-metric": ErrorCode.BAD_METRICS,
}


@dataclass(frozen=True)
class GatewayTuning:
    """Knobs of one gateway process that are not fleet settings (defaults suit most)."""

    registry_cache_seconds: float = 300.0  # how long "device X is enrolled for job J" is trusted
    unknown_device_cache_seconds: float = 2.0  # how long "not enrolled" is trusted
    no_job_retry_seconds: float = 5.0
    recent_results: int = 100_000  # (task, device) pairs remembered for duplicate answers
    artifact_cache_bytes: int = 512 * 1024 * 1024
    io_threads: int = 16  # S3 calls and large tensor checks run here, off the event loop
    inline_check_bytes: int = 256 * 1024  # smaller updates are checked on the loop (no hop)
    body_budget_bytes: int = 256 * 1024 * 1024  # upload bodies held at once (then 503)


@dataclass(frozen=True)
class LeafView:
    """One leaf's task as read from S3, with lookups precomputed once per read."""

    active: ActiveRound
    task: LeafTask
    selected: frozenset[str]
    specs: dict[str, TensorSpec]

    def accepting(self, now: datetime) -> bool:
        return (
            self.active.status == "open"
            and self.task.status == "open"
            and now <= self.task.deadline
        )


def _jitter(seconds: float, device_id: str, rnd: int) -> float:
    """Spread re-polls over [0.8, 1.2] x ``seconds``, stable per device and round."""
    digest = hashlib.sha256(f"{device_id}:{rnd}".encode()).digest()
    return round(seconds * (0.8 + 0.4 * digest[0] / 255), 3)


def _choose_runtime(task_runtime: Runtime, device: tuple[Runtime, ...]) -> Runtime | None:
    """The task's runtime if the device has it; eager PyTorch can train any task's weights."""
    if task_runtime in device:
        return task_runtime
    return "pytorch" if "pytorch" in device else None


class GatewayService:
    """Enrol devices, answer polls, serve models, accept updates."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: ObjectStore,
        *,
        gateway_id: str,
        metrics: GatewayMetrics,
        tuning: GatewayTuning | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.gateway_id = check_segment(gateway_id, "gateway id")
        self.metrics = metrics
        self.tuning = tuning or GatewayTuning()
        self._secret = settings.token_secret.get_secret_value().encode()
        self.executor = ThreadPoolExecutor(self.tuning.io_threads, thread_name_prefix="gw-io")
        ttl = settings.manifest_cache_seconds
        self._active: TtlCache[str, ActiveRound | None] = TtlCache(lambda _: ttl, max_entries=1024)
        self._leaves: TtlCache[str, LeafView] = TtlCache(lambda _: ttl, max_entries=4096)
        self._known: TtlCache[tuple[str, str], bool] = TtlCache(
            lambda known: (
                self.tuning.registry_cache_seconds
                if known
                else self.tuning.unknown_device_cache_seconds
            ),
            max_entries=200_000,
        )
        self._artifacts = BytesCache(self.tuning.artifact_cache_bytes)
        self._recent: OrderedDict[tuple[str, str], tuple[int, datetime]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[UploadReceipt]] = {}
        self.committer = GroupCommitter(
            store,
            self.executor,
            metrics,
            gateway_id=self.gateway_id,
            max_updates=settings.group_commit_max_updates,
            max_wait_seconds=settings.group_commit_max_wait_ms / 1000.0,
        )

    async def close(self) -> None:
        await self.committer.drain()
        self.executor.shutdown(wait=True)

    async def _io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # --- enrolment and authentication ------------------------------------------------

    async def enrol(self, request: EnrolRequest) -> EnrolResponse:
        expected = self.settings.enrolment_secret.get_secret_value().encode()
        if not secrets.compare_digest(request.enrolment_secret.encode(), expected):
            raise ProtocolError(401, ErrorCode.BAD_ENROLMENT_SECRET, "enrolment secret is wrong")
        now = datetime.now(UTC)
        runtimes = sorted(set(request.runtimes))
        for job in sorted(set(request.jobs)):
            record = DeviceRecord(
                device_id=request.device_id,
                job=job,
                runtimes=runtimes,
                platform=request.platform,
                app_version=request.app_version,
                enrolled_at=now,
                gateway_id=self.gateway_id,
            )
            key = device_key(job, request.device_id)
            await self._store_call(
                functools.partial(put_json, self.store, key, record, kind=KIND_DEVICE_RECORD)
            )
            self._known.put((job, request.device_id), True)
        token, expires = issue_token(
            self._secret,
            request.device_id,
            tuple(runtimes),
            now=int(now.timestamp()),
            ttl=self.settings.token_ttl_seconds,
        )
        self.metrics.enrolments.inc()
        return EnrolResponse(
            device_id=request.device_id,
            token=token,
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    def authenticate(self, authorization: str | None, device_id: str) -> TokenClaims:
        """The token's claims, if it is valid and was issued to ``device_id``."""
        if not authorization:
            raise ProtocolError(
                401, ErrorCode.MISSING_TOKEN, "send 'Authorization: Bearer <token>' (enrol first)"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ProtocolError(
                401, ErrorCode.MISSING_TOKEN, "Authorization must be 'Bearer <token>'"
            )
        claims = verify_token(self._secret, token.strip(), now=int(time.time()))
        if claims.device_id != device_id:
            raise ProtocolError(
                403,
                ErrorCode.DEVICE_MISMATCH,
                f"token belongs to device {claims.device_id!r}, not {device_id!r}",
            )
        return claims

    # --- manifests -----------------------------------------------------------------------

    async def _store_call(self, fn: Any, *args: Any) -> Any:
        """Run a store call off the loop; any storage failure is a 503 for the device."""
        try:
            return await self._io(fn, *args)
        except (ObjectNotFoundError, ProtocolError):
            raise
        except Exception as exc:  # boto, network, integrity: the device should retry later
            log.error("store call %s failed: %s", getattr(fn, "__name__", fn), exc)
            raise ProtocolError(
                503,
                ErrorCode.STORE_UNAVAILABLE,
                "the gateway cannot reach its storage right now; retry later",
                retry_after=2.0,
            ) from exc

    async def active_round(self, job: str) -> ActiveRound | None:
        try:
            key = active_job_key(job)
        except ValueError as exc:
            raise ProtocolError(422, ErrorCode.BAD_REQUEST, str(exc)) from exc

        async def load() -> ActiveRound | None:
            try:
                payload = await self._store_call(get_json, self.store, key)
            except ObjectNotFoundError:
                return None
            return self._parse(ActiveRound, payload, key)

        return await self._active.get(job, load)

    async def leaf_view(self, active: ActiveRound, leaf: str) -> LeafView:
        key = active.leaf_manifest_keys[leaf]

        async def load() -> LeafView:
            try:
                payload = await self._store_call(get_json, self.store, key)
            except ObjectNotFoundError as exc:
                log.error("active round of %s points at missing manifest %s", active.job, key)
                raise ProtocolError(
                    503,
                    ErrorCode.STORE_UNAVAILABLE,
                    "round manifest not readable yet; retry",
                    retry_after=active.poll_seconds,
                ) from exc
            task = self._parse(LeafTask, payload, key)
            return LeafView(active, task, frozenset(task.selected_device_ids), task.specs())

        view = await self._leaves.get(key, load)
        # The ActiveRound may be newer than the cached leaf (e.g. just closed): use the newest.
        return (
            view
            if view.active == active
            else LeafView(active, view.task, view.selected, view.specs)
        )

    @staticmethod
    def _parse(model: Any, payload: Any, key: str) -> Any:
        try:
            return model.model_validate(payload)
        except pydantic.ValidationError as exc:
            log.error("manifest %s is invalid: %s", key, exc)
            raise ProtocolError(
                503,
                ErrorCode.STORE_UNAVAILABLE,
                "round manifest is unreadable; retry later",
                retry_after=5.0,
            ) from exc

    async def _require_enrolled(self, job: str, device_id: str) -> None:
        key = device_key(job, device_id)

        async def load() -> bool:
            return await self._store_call(self.store.head, key) is not None

        if not await self._known.get((job, device_id), load):
            raise ProtocolError(
                404,
                ErrorCode.UNKNOWN_DEVICE,
                f"device {device_id!r} is not enrolled for job {job!r}; enrol first",
            )

    async def current_view(self, job: str, device_id: str) -> LeafView | None:
        active = await self.active_round(job)
        if active is None or active.status == "done":
            return None
        return await self.leaf_view(active, leaf_for_device(device_id, active.leaves))

    # --- poll ------------------------------------------------------------------------------

    async def poll(
        self, job: str, claims: TokenClaims
    ) -> TaskAnswer | RetryAnswer | NoJobAnswer | DoneAnswer:
        device = claims.device_id
        active = await self.active_round(job)
        if active is None:
            await self._require_enrolled(job, device)
            return NoJobAnswer(job=job, retry_after_seconds=self.tuning.no_job_retry_seconds)
        if active.status == "done":
            return DoneAnswer(job=job, run_id=active.run_id, round=active.round)

        def retry(reason: RetryReason, seconds: float) -> RetryAnswer:
            return RetryAnswer(
                reason=reason,
                retry_after_seconds=_jitter(seconds, device, active.round),
                job=job,
                round=active.round,
            )

        if active.status != "open":
            return retry("round_not_open", active.poll_seconds)
        view = await self.leaf_view(active, leaf_for_device(device, active.leaves))
        if not view.accepting(datetime.now(UTC)):
            return retry("round_not_open", active.poll_seconds)
        if device not in view.selected:
            await self._require_enrolled(job, device)
            return retry("not_selected", active.idle_poll_seconds)
        key = (view.task.task_id, device)
        if key in self._recent or key in self._inflight:
            return retry("already_submitted", active.idle_poll_seconds)
        runtime = _choose_runtime(view.task.runtime, claims.runtimes)
        if runtime is None:
            return retry("runtime_unsupported", active.idle_poll_seconds)
        self.metrics.tasks_served.labels(job=job).inc()
        return TaskAnswer(task=self._offer(view.task, device, runtime))

    def _offer(self, task: LeafTask, device_id: str, runtime: Runtime) -> TaskOffer:
        def artifact(fmt: ModelFormat, ref: ObjectRef) -> ArtifactInfo:
            url = model_path(task.job, device_id, task.task_id, fmt)
            return ArtifactInfo(format=fmt, url=url, sha256=ref.sha256, size=ref.size)

        weights = artifact("safetensors", task.global_model)
        model = (
            artifact("pte", task.program) if runtime == "executorch" and task.program else weights
        )
        return TaskOffer(
            task_id=task.task_id,
            job=task.job,
            run_id=task.run_id,
            round=task.round,
            leaf=task.leaf,
            runtime=runtime,
            model_version=task.model_version,
            model=model,
            weights=weights,
            upload_url=result_path(task.job, device_id, task.task_id),
            deadline=task.deadline,
            hyperparams=task.hyperparams,
            tensor_spec=task.tensor_spec,
            data_hint=task.data_hint.model_dump() if task.data_hint else None,
        )

    # --- model download ----------------------------------------------------------------------

    async def model(
        self, job: str, claims: TokenClaims, task_id: str, fmt: ModelFormat | None
    ) -> tuple[bytes, ObjectRef, ModelFormat, LeafTask]:
        view = await self.current_view(job, claims.device_id)
        if view is None or view.task.task_id != task_id or not view.accepting(datetime.now(UTC)):
            raise ProtocolError(
                409,
                ErrorCode.TASK_NOT_CURRENT,
                f"task {task_id!r} is not current for this device; poll for a new task",
            )
        if claims.device_id not in view.selected:
            raise ProtocolError(403, ErrorCode.NOT_SELECTED, "device is not selected for this task")
        task = view.task
        if fmt is None:
            runtime = _choose_runtime(task.runtime, claims.runtimes)
            fmt = "pte" if runtime == "executorch" and task.program else "safetensors"
        ref = task.global_model if fmt == "safetensors" else task.program
        if ref is None:
            raise ProtocolError(404, ErrorCode.NO_PROGRAM, "this round has no ExecuTorch program")
        data = await self._artifacts.get(ref.sha256, lambda: self._load_artifact(ref))
        self.metrics.model_downloads.labels(format=fmt).inc()
        return data, ref, fmt, task

    async def _load_artifact(self, ref: ObjectRef) -> bytes:
        obj = await self._store_call(lambda: self.store.get(ref.key, expected_sha256=ref.sha256))
        return bytes(obj.data)

    # --- upload ------------------------------------------------------------------------------

    async def check_upload(
        self, job: str, claims: TokenClaims, task_id: str, model_version: str | None
    ) -> LeafView | UploadReceipt:
        """Everything decidable before reading the body: duplicate, late, not selected."""
        key = (task_id, claims.device_id)
        if (seen := self._recent.get(key)) is not None:
            self.metrics.results_duplicate.inc()
            return self._receipt(task_id, claims.device_id, seen[0], seen[1], duplicate=True)
        if (pending := self._inflight.get(key)) is not None:
            receipt = await asyncio.shield(pending)
            self.metrics.results_duplicate.inc()
            return receipt.model_copy(update={"duplicate": True})
        view = await self.current_view(job, claims.device_id)
        now = datetime.now(UTC)
        if view is None or view.task.task_id != task_id:
            raise self._late(job, "task_not_current", f"task {task_id!r} is not the current task")
        if not view.accepting(now):
            raise self._late(
                job, "round_closed", f"round {view.task.round} no longer accepts results"
            )
        if claims.device_id not in view.selected:
            raise ProtocolError(403, ErrorCode.NOT_SELECTED, "device is not selected for this task")
        if not model_version:
            raise ProtocolError(
                422, ErrorCode.BAD_MODEL_VERSION, "header X-Canopy-Model-Version is required"
            )
        if model_version != view.task.model_version:
            raise self._late(
                job,
                "model_version_not_current",
                f"model version {model_version[:16]!r} is not the round's current model",
            )
        return view

    def _late(self, job: str, reason: str, message: str) -> ProtocolError:
        self.metrics.late_results.labels(job=job).inc()
        return ProtocolError(
            409,
            ErrorCode.LATE,
            f"{message}; the result is not aggregated. Poll for the current task.",
            details={"reason": reason},
        )

    async def accept(
        self,
        view: LeafView,
        claims: TokenClaims,
        body: bytes,
        *,
        num_samples: int,
        metrics: dict[str, float],
    ) -> UploadReceipt:
        """Validate the tensors, commit them with the leaf's batch, then acknowledge."""
        task, device = view.task, claims.device_id
        key = (task.task_id, device)
        if key in self._inflight:  # the same device raced itself while we read its body
            receipt = await asyncio.shield(self._inflight[key])
            return receipt.model_copy(update={"duplicate": True})
        future: asyncio.Future[UploadReceipt] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            tensors = await self._io(
                _decode_and_check, body, view.specs, device, num_samples, metrics
            )
            received = datetime.now(UTC)
            update = DeviceUpdate(
                device_id=device,
                task_id=task.task_id,
                model_version=task.model_version,
                num_samples=num_samples,
                tensors=tensors,
                metrics=metrics,
                received_at=received,
                gateway_id=self.gateway_id,
            )
            context = BatchContext(task.job, task.run_id, task.round, task.leaf, self.gateway_id)
            await self.committer.commit(context, task.global_model, update)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here; racing duplicates re-raise it themselves
            raise
        finally:
            self._inflight.pop(key, None)
        self._remember(key, task.round, received)
        self.metrics.results_accepted.labels(job=task.job).inc()
        receipt = self._receipt(task.task_id, device, task.round, received, duplicate=False)
        future.set_result(receipt)
        return receipt

    def _remember(self, key: tuple[str, str], rnd: int, received: datetime) -> None:
        self._recent[key] = (rnd, received)
        while len(self._recent) > self.tuning.recent_results:
            self._recent.popitem(last=False)

    @staticmethod
    def _receipt(
        task_id: str, device_id: str, rnd: int, received: datetime, *, duplicate: bool
    ) -> UploadReceipt:
        return UploadReceipt(
            duplicate=duplicate,
            task_id=task_id,
            device_id=device_id,
            round=rnd,
            received_at=received,
        )


def _decode_and_check(
    body: bytes,
    specs: Mapping[str, TensorSpec],
    device_id: str,
    num_samples: int,
    metrics: Mapping[str, float],
) -> TensorDict:
    """Parse the safetensors body and run the aggregation guards (in a worker thread)."""
    try:
        tensors, _ = decode_tensors(body, source=f"update from {device_id}")
    except ValidationError as exc:
        raise ProtocolError(422, ErrorCode.MALFORMED_UPDATE, str(exc)) from exc
    try:
        check_update(tensors, spec=specs, device_id=device_id, weight=num_samples, metrics=metrics)
    except UpdateRejected as exc:
        raise ProtocolError(
            422,
            _GUARD_CODES.get(exc.reason, ErrorCode.BAD_REQUEST),
            str(exc),
            tensor=exc.tensor,
            details={"reason": exc.reason},
        ) from exc
    return tensors
