"""The upload desk: what happens between a device's POST and its acknowledgement.

Checks run cheapest first: the headers (no I/O), then the round's state from
the cached manifests (a late result or a device that was not selected is
refused without reading 64 MiB, and so is a sample count over the task's
``max_num_samples`` or a body of the wrong type for the task's kind), then the
body: a training task's safetensors update (``update_check``: names, shapes,
dtypes, NaN/Inf), or an evaluation task's ``EvaluationResult`` JSON
(``edge.protocol.parse_evaluation``: exactly the task's metrics, finite).
Only an update that passed all of them is looked up among the results already
accepted: a replay with a NaN or garbage body is a 422 like any other bad
body, never a ``duplicate``. A new update joins its
leaf's group commit, and the device gets its receipt only when the batch is in
S3 *and* the round was still open after the write (the close fence, see
``batcher`` and docs/gateway.md).

The only memory here is a bounded set of recently accepted (task, device)
pairs, each with the leaf view it was checked against, so a retried upload
that reaches the same gateway is validated like the first and answered
``duplicate`` instead of being stored twice. A retry that reaches another
gateway may be stored twice; the leaf aggregation de-duplicates by device id.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from concurrent.futures import Executor
from datetime import UTC, datetime

from aggregation.tensors import TensorDict
from edge.gateway.batcher import Arrival, GroupCommitter
from edge.gateway.metrics import GatewayMetrics
from edge.gateway.rounds import LeafView, RoundDirectory
from edge.gateway.tokens import TokenClaims
from edge.gateway.tuning import GatewayTuning
from edge.gateway.update_check import decode_and_check
from edge.manifests import LeafTask
from edge.protocol import (
    ErrorCode,
    ProtocolError,
    UploadHeaders,
    UploadReceipt,
    check_content_type_for,
    parse_evaluation,
)
from edge.update_batch import BatchContext, DeviceUpdate

Key = tuple[str, str]  # (task id, device id)


class UploadDesk:
    """Check, store and acknowledge device updates."""

    def __init__(
        self,
        rounds: RoundDirectory,
        committer: GroupCommitter,
        metrics: GatewayMetrics,
        executor: Executor,
        *,
        gateway_id: str,
        tuning: GatewayTuning,
    ) -> None:
        self._rounds = rounds
        self._committer = committer
        self._metrics = metrics
        self._executor = executor
        self._gateway_id = gateway_id
        self._tuning = tuning
        self._recent: OrderedDict[Key, tuple[LeafView, datetime]] = OrderedDict()
        self._inflight: dict[Key, asyncio.Future[UploadReceipt]] = {}

    def already_submitted(self, task_id: str, device_id: str) -> bool:
        key = (task_id, device_id)
        return key in self._recent or key in self._inflight

    async def admit(
        self, job: str, claims: TokenClaims, task_id: str, headers: UploadHeaders
    ) -> LeafView:
        """Everything decidable before reading the body: late, not selected, too many
        samples, a body type the task's kind does not take.

        A result this gateway already accepted is admitted against the view it was
        accepted with (the round may have moved on since), so that its replay is
        validated like the original and then answered ``duplicate``.
        """
        remembered = self._recent.get((task_id, claims.device_id))
        view = remembered[0] if remembered is not None else await self._current(job, claims)
        if remembered is None and view.task.task_id != task_id:
            raise self._late(job, "task_not_current", f"task {task_id!r} is not the current task")
        if remembered is None and not view.accepting(datetime.now(UTC)):
            raise self._late(
                job, "round_closed", f"round {view.task.round} no longer accepts results"
            )
        if claims.device_id not in view.selected:
            raise ProtocolError(403, ErrorCode.NOT_SELECTED, "device is not selected for this task")
        if headers.model_version != view.task.model_version:
            raise self._late(
                job,
                "model_version_not_current",
                f"model version {headers.model_version[:16]!r} is not the round's current model",
            )
        limit = view.task.sample_limit()
        if headers.num_samples > limit:
            raise ProtocolError(
                422,
                ErrorCode.TOO_MANY_SAMPLES,
                f"{headers.num_samples} samples is more than the {limit} a device of this task "
                "may claim",
                details={"max_num_samples": limit, "num_samples": headers.num_samples},
            )
        check_content_type_for(view.task.kind, headers.content_type)
        return view

    def arriving(self, view: LeafView) -> Arrival:
        """Tell the group commit that an admitted upload for ``view``'s leaf is on its
        way, so its open batch may wait for it (close it, or use it as a context manager;
        ``accept`` closes it as the update joins the batch)."""
        return self._committer.expect(self._context(view.task))

    def _context(self, task: LeafTask) -> BatchContext:
        return BatchContext(
            task.job, task.run_id, task.round, task.leaf, self._gateway_id, task.kind
        )

    async def _current(self, job: str, claims: TokenClaims) -> LeafView:
        view = await self._rounds.current_view(job, claims.device_id)
        if view is None:
            raise self._late(job, "task_not_current", "no round of this job is running")
        return view

    async def accept(
        self,
        view: LeafView,
        claims: TokenClaims,
        body: bytes,
        headers: UploadHeaders,
        arrival: Arrival | None = None,
    ) -> UploadReceipt:
        """Validate the body, then answer a duplicate or commit and acknowledge.

        ``arrival`` (from ``arriving``) is handed to the group commit with the update.
        """
        task, device = view.task, claims.device_id
        key = (task.task_id, device)
        metrics = headers.metrics
        tensors: TensorDict = {}
        if task.kind == "evaluate":
            metrics = parse_evaluation(body, task.metrics)  # a few hundred bytes of JSON
        elif len(body) <= self._tuning.inline_check_bytes:
            # microseconds: a thread hop costs more
            tensors = decode_and_check(body, view.specs, device, headers.num_samples, metrics)
        else:
            loop = asyncio.get_running_loop()
            args = (body, view.specs, device, headers.num_samples, metrics)
            tensors = await loop.run_in_executor(self._executor, decode_and_check, *args)
        if (seen := self._recent.get(key)) is not None:
            self._metrics.results_duplicate.inc()
            return _receipt(key, seen[0].task.round, seen[1], duplicate=True)
        if (pending := self._inflight.get(key)) is not None:  # the device raced itself
            return await self._duplicate_of(pending)
        future: asyncio.Future[UploadReceipt] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        received = datetime.now(UTC)
        try:
            update = DeviceUpdate(
                device_id=device,
                task_id=task.task_id,
                model_version=task.model_version,
                num_samples=headers.num_samples,
                tensors=tensors,
                metrics=metrics,
                received_at=received,
                gateway_id=self._gateway_id,
            )
            await self._committer.commit(self._context(task), task.global_model, update, arrival)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here; racing duplicates re-raise it themselves
            raise
        finally:
            self._inflight.pop(key, None)
        self._remember(key, view, received)
        self._metrics.results_accepted.labels(job=task.job).inc()
        receipt = _receipt(key, task.round, received, duplicate=False)
        future.set_result(receipt)
        return receipt

    async def _duplicate_of(self, pending: asyncio.Future[UploadReceipt]) -> UploadReceipt:
        receipt = await asyncio.shield(pending)
        self._metrics.results_duplicate.inc()
        return receipt.model_copy(update={"duplicate": True})

    def _late(self, job: str, reason: str, message: str) -> ProtocolError:
        self._metrics.late_results.labels(job=job).inc()
        return ProtocolError(
            409,
            ErrorCode.LATE,
            f"{message}; the result is not aggregated. Poll for the current task.",
            details={"reason": reason},
        )

    def _remember(self, key: Key, view: LeafView, received: datetime) -> None:
        self._recent[key] = (view, received)
        while len(self._recent) > self._tuning.recent_results:
            self._recent.popitem(last=False)


def _receipt(key: Key, rnd: int, received: datetime, *, duplicate: bool) -> UploadReceipt:
    return UploadReceipt(
        duplicate=duplicate, task_id=key[0], device_id=key[1], round=rnd, received_at=received
    )
