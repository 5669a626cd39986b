"""What a gateway does for a device, independent of HTTP.

A task is either training (the device uploads an update) or a federated
evaluation (it uploads metrics only); the manifests say which, and the gateway
offers, serves and checks both the same way except for the upload's body.

The gateway owns no round state: the current task of each leaf comes from the
S3 manifests (``RoundDirectory``, cached for ``manifest_cache_seconds``), a
device's leaf is ``leaf_for_device`` of its id, and accepted updates go to S3
through the group committer before the device is acknowledged
(``UploadDesk``). Two gateways reading the same manifests therefore give a
device the same answer, and a killed gateway loses nothing it acknowledged.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from edge.gateway.batcher import GroupCommitter
from edge.gateway.enrolment import EnrolmentDesk
from edge.gateway.metrics import GatewayMetrics
from edge.gateway.rounds import RoundDirectory, StoreCalls
from edge.gateway.tokens import TokenClaims, verify_token
from edge.gateway.tuning import GatewayTuning
from edge.gateway.uploads import UploadDesk
from edge.gateway.watch import RoundMark, RoundWatch, round_mark
from edge.manifests import ActiveRound, LeafTask, Runtime
from edge.protocol import (
    ArtifactInfo,
    ChallengeRequest,
    ChallengeResponse,
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
    model_path,
    result_path,
)
from edge.routing import leaf_for_device
from infra.keys import check_segment
from infra.settings import GatewaySettings
from infra.store import ObjectRef, ObjectStore

PollResult = TaskAnswer | RetryAnswer | NoJobAnswer | DoneAnswer


def jitter(seconds: float, device_id: str, rnd: int) -> float:
    """Spread re-polls over [0.8, 1.2] x ``seconds``, stable per device and round."""
    digest = hashlib.sha256(f"{device_id}:{rnd}".encode()).digest()
    return round(seconds * (0.8 + 0.4 * digest[0] / 255), 3)


def choose_runtime(task_runtime: Runtime, device: tuple[Runtime, ...]) -> Runtime | None:
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
        self.calls = StoreCalls(store, self.executor)
        self.rounds = RoundDirectory(
            self.calls, manifest_ttl=settings.manifest_cache_seconds, tuning=self.tuning
        )
        self.committer = GroupCommitter(
            store,
            self.executor,
            metrics,
            gateway_id=self.gateway_id,
            max_updates=settings.group_commit_max_updates,
            max_wait_seconds=settings.group_commit_max_wait_ms / 1000.0,
            idle_wait_seconds=self.tuning.group_commit_idle_wait_seconds,
            fence=self.rounds.confirm_open,
        )
        self.enrolment = EnrolmentDesk(
            settings,
            self.calls,
            self.rounds,
            metrics,
            gateway_id=self.gateway_id,
            tuning=self.tuning,
        )
        self.watch = RoundWatch(
            self.rounds.fresh_active_round,
            interval=self.tuning.watch_interval_seconds,
            soon_interval=self.tuning.watch_soon_interval_seconds,
            soon_window=self.tuning.watch_soon_window_seconds,
            min_gap=self.tuning.watch_min_gap_seconds,
        )
        self.uploads = UploadDesk(
            self.rounds,
            self.committer,
            metrics,
            self.executor,
            gateway_id=self.gateway_id,
            tuning=self.tuning,
        )

    async def close(self) -> None:
        """Write open batches (their devices are waiting), then stop the I/O threads."""
        await self.watch.close()
        await self.committer.drain()
        self.executor.shutdown(wait=True)

    # --- enrolment and authentication ------------------------------------------------

    def challenge(self, request: ChallengeRequest) -> ChallengeResponse:
        return self.enrolment.challenge(request)

    async def enrol(self, request: EnrolRequest) -> EnrolResponse:
        return await self.enrolment.enrol(request)

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

    # --- poll ------------------------------------------------------------------------------

    async def poll(self, job: str, claims: TokenClaims, *, wait: float = 0.0) -> PollResult:
        """A task, or when to ask again, or that nothing runs, or that the job is done.

        With ``wait`` > 0 (a long poll), an answer that offers nothing is held until
        the job's round moves or ``wait`` seconds pass (``edge.gateway.watch``); a
        hold that ran out answers "retry after 0 s": the wait was the pause.
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + min(wait, self.tuning.long_poll_max_seconds)
        while True:
            answer, mark = await self._answer(job, claims)
            left = give_up - loop.time()
            if isinstance(answer, TaskAnswer | DoneAnswer) or left <= 0:
                return answer
            if not await self.watch.wait_change(job, mark, left):
                return answer.model_copy(update={"retry_after_seconds": 0.0})

    async def _answer(self, job: str, claims: TokenClaims) -> tuple[PollResult, RoundMark]:
        """The poll's answer from the (cached) state, and the round state it rests on."""
        device = claims.device_id
        active = await self.rounds.active_round(job)
        if active is None:
            await self.rounds.require_enrolled(job, device)
            answer = NoJobAnswer(job=job, retry_after_seconds=self.tuning.no_job_retry_seconds)
            return answer, None
        return await self._answer_in(active, job, claims), round_mark(active)

    async def _answer_in(self, active: ActiveRound, job: str, claims: TokenClaims) -> PollResult:
        device = claims.device_id
        if active.status == "done":
            return DoneAnswer(job=job, run_id=active.run_id, round=active.round)

        def retry(reason: RetryReason, seconds: float) -> RetryAnswer:
            return RetryAnswer(
                reason=reason,
                retry_after_seconds=jitter(seconds, device, active.round),
                job=job,
                round=active.round,
            )

        if active.status != "open":
            return retry("round_not_open", active.poll_seconds)
        view = await self.rounds.leaf_view(active, leaf_for_device(device, active.leaves))
        if not view.accepting(datetime.now(UTC)):
            return retry("round_not_open", active.poll_seconds)
        if device not in view.selected:
            await self.rounds.require_enrolled(job, device)
            return retry("not_selected", active.idle_poll_seconds)
        if self.uploads.already_submitted(view.task.task_id, device):
            return retry("already_submitted", active.idle_poll_seconds)
        runtime = choose_runtime(view.task.runtime, claims.runtimes)
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
            kind=task.kind,
            metrics=task.metrics,
            runtime=runtime,
            model_version=task.model_version,
            model=model,
            weights=weights,
            upload_url=result_path(task.job, device_id, task.task_id),
            deadline=task.deadline,
            max_num_samples=task.sample_limit(),
            hyperparams=task.hyperparams,
            tensor_spec=task.tensor_spec,
            data_hint=task.data_hint.model_dump() if task.data_hint else None,
        )

    # --- model download ----------------------------------------------------------------------

    async def model(
        self, job: str, claims: TokenClaims, task_id: str, fmt: ModelFormat | None
    ) -> tuple[bytes, ObjectRef, ModelFormat, LeafTask]:
        """The artifact bytes of the device's current task (``fmt`` None: what it trains)."""
        view = await self.rounds.current_view(job, claims.device_id)
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
            runtime = choose_runtime(task.runtime, claims.runtimes)
            fmt = "pte" if runtime == "executorch" and task.program else "safetensors"
        ref = task.global_model if fmt == "safetensors" else task.program
        if ref is None:
            raise ProtocolError(404, ErrorCode.NO_PROGRAM, "this round has no ExecuTorch program")
        data = await self.rounds.artifact(ref)
        self.metrics.model_downloads.labels(format=fmt).inc()
        return data, ref, fmt, task
