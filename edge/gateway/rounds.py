"""The gateway's read side of S3: round manifests, the device registry, model bytes.

Everything here is a cache in front of the store, never a source of truth:
``ActiveRound`` (the one object the flow rewrites) lives ``manifest_cache_seconds``,
a ``LeafTask`` lives as long as the opening of the round that points at it, "device X is
enrolled for job J" lives ``registry_cache_seconds``, and model artifacts are
keyed by sha256 so they never go stale. Concurrent misses share one load, so a
burst of polls costs one GET per manifest. Reading a leaf's task also starts
loading its model bytes (``prefetch``): the leaf's selected devices ask for them
right after their offer, and then find them in memory instead of waiting for a
GET. Any storage failure becomes a 503 for the device, which retries; a manifest
the gateway cannot parse is logged and treated the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import pydantic

from aggregation.tensors import TensorSpec
from edge.gateway.cache import BytesCache, FreshReads, TtlCache
from edge.gateway.tuning import GatewayTuning
from edge.manifests import ActiveRound, LeafTask, device_key
from edge.protocol import ErrorCode, ProtocolError
from edge.routing import leaf_for_device
from edge.update_batch import BatchContext
from infra.errors import ObjectNotFoundError
from infra.keys import active_job_key
from infra.store import ObjectRef, ObjectStore, get_json

log = logging.getLogger("canopy.gateway")

M = TypeVar("M", bound=pydantic.BaseModel)


@dataclass(frozen=True)
class LeafView:
    """One leaf's task as read from S3, with lookups precomputed once per read."""

    active: ActiveRound
    task: LeafTask
    selected: frozenset[str]
    specs: dict[str, TensorSpec]

    def accepting(self, now: datetime) -> bool:
        """Whether uploads for this task are still taken (round open, deadline ahead)."""
        return (
            self.active.status == "open"
            and self.task.status == "open"
            and now <= self.task.deadline
        )


def unavailable(message: str, retry_after: float = 2.0) -> ProtocolError:
    return ProtocolError(503, ErrorCode.STORE_UNAVAILABLE, message, retry_after=retry_after)


class StoreCalls:
    """Blocking store calls run in a thread pool; failures become 503s for devices."""

    def __init__(self, store: ObjectStore, executor: Executor) -> None:
        self.store = store
        self.executor = executor

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except (ObjectNotFoundError, ProtocolError):
            raise
        except Exception as exc:  # boto, network, integrity: the device should retry later
            log.error("store call %s failed: %s", getattr(fn, "__name__", fn), exc)
            raise unavailable(
                "the gateway cannot reach its storage right now; retry later"
            ) from exc


class RoundDirectory:
    """Cached answers to "which round, which task, is this device enrolled, give me the model"."""

    def __init__(self, calls: StoreCalls, *, manifest_ttl: float, tuning: GatewayTuning) -> None:
        self.calls = calls
        self._active: TtlCache[str, ActiveRound | None] = TtlCache(
            lambda _: manifest_ttl, max_entries=1024
        )
        # Keyed by (manifest key, the opening that points at it): one GET per leaf per round
        # opening per gateway, however long the round, instead of one per manifest_ttl.
        self._leaves: TtlCache[tuple[str, str, datetime], LeafView] = TtlCache(
            lambda _: tuning.leaf_task_cache_seconds, max_entries=4096
        )
        self._known: TtlCache[tuple[str, str], bool] = TtlCache(
            lambda known: (
                tuning.registry_cache_seconds if known else tuning.unknown_device_cache_seconds
            ),
            max_entries=200_000,
        )
        self._artifacts = BytesCache(tuning.artifact_cache_bytes)
        self._fence_reads: FreshReads[str, ActiveRound | None] = FreshReads()
        self._prefetches: set[asyncio.Future[bytes]] = set()

    async def active_round(self, job: str) -> ActiveRound | None:
        """The job's ActiveRound, or None when no run of it was ever opened."""
        try:
            active_job_key(job)
        except ValueError as exc:
            raise ProtocolError(422, ErrorCode.BAD_REQUEST, str(exc)) from exc
        return await self._active.get(job, lambda: self._load_active(job))

    async def _load_active(self, job: str) -> ActiveRound | None:
        key = active_job_key(job)
        try:
            payload = await self.calls.run(get_json, self.calls.store, key)
        except ObjectNotFoundError:
            return None
        return _parse(ActiveRound, payload, key)

    async def fresh_active_round(self, job: str) -> ActiveRound | None:
        """The job's ActiveRound by a GET that starts after this call (shared by callers
        who asked meanwhile, see ``FreshReads``); what it read refreshes the cache.
        """
        active = await self._fence_reads.read(job, lambda: self._load_active(job))
        self._active.put(job, active)
        return active

    async def confirm_open(self, context: BatchContext) -> None:
        """The close fence: 409 ``late`` unless S3 says this run's round is open *now*
        (for the batch's kind: a training batch is late once the evaluation opened).

        Read uncached, by a GET that starts after the batch PUT returned (the ordering
        is the point; see docs/gateway.md). Batches whose PUTs return while such a GET
        runs share the next one (``FreshReads``), so the fence costs at most one GET
        at a time per job. What it read also refreshes the cache, so the door turns
        later uploads of a closed round away at once instead of after the cache period.
        """
        active = await self.fresh_active_round(context.job)
        if (
            active is None
            or active.status != "open"
            or (active.run_id, active.round, active.kind)
            != (context.run_id, context.round, context.kind)
        ):
            raise ProtocolError(
                409,
                ErrorCode.LATE,
                f"round {context.round} of run {context.run_id!r} closed while the update was "
                "being stored, so it is not acknowledged (it may or may not be aggregated). "
                "Do not upload it again; poll for the current task.",
                details={"reason": "round_closed_during_write"},
            )

    async def leaf_view(self, active: ActiveRound, leaf: str) -> LeafView:
        key = active.leaf_manifest_keys[leaf]

        async def load() -> LeafView:
            try:
                payload = await self.calls.run(get_json, self.calls.store, key)
            except ObjectNotFoundError as exc:
                log.error("active round of %s points at missing manifest %s", active.job, key)
                raise unavailable(
                    "round manifest not readable yet; retry", active.poll_seconds
                ) from exc
            task = _parse(LeafTask, payload, key)
            self.prefetch(task)
            return LeafView(active, task, frozenset(task.selected_device_ids), task.specs())

        view = await self._leaves.get((key, active.run_id, active.opened_at), load)
        # The ActiveRound may be newer than the cached leaf (e.g. just closed): use the newest.
        if view.active == active:
            return view
        return LeafView(active, view.task, view.selected, view.specs)

    async def current_view(self, job: str, device_id: str) -> LeafView | None:
        """The device's leaf task in the job's current round (None: no run, or done)."""
        active = await self.active_round(job)
        if active is None or active.status == "done":
            return None
        return await self.leaf_view(active, leaf_for_device(device_id, active.leaves))

    def remember_enrolled(self, job: str, device_id: str) -> None:
        self._known.put((job, device_id), True)

    async def require_enrolled(self, job: str, device_id: str) -> None:
        """404 ``unknown_device`` unless ``devices/{job}/{device_id}.json`` exists."""
        key = device_key(job, device_id)

        async def load() -> bool:
            return await self.calls.run(self.calls.store.head, key) is not None

        if not await self._known.get((job, device_id), load):
            raise ProtocolError(
                404,
                ErrorCode.UNKNOWN_DEVICE,
                f"device {device_id!r} is not enrolled for job {job!r}; enrol first",
            )

    def prefetch(self, task: LeafTask) -> None:
        """Start loading what ``task``'s devices will download (weights; the program too
        for an ExecuTorch task), without waiting. A failure is only logged: a device's
        own download then loads the bytes again and gets the 503 if the store is away.
        """
        refs = [task.global_model]
        if task.runtime == "executorch" and task.program is not None:
            refs.append(task.program)
        for ref in refs:
            loading = asyncio.ensure_future(self.artifact(ref))
            self._prefetches.add(loading)  # held: a task nobody references may vanish
            loading.add_done_callback(self._prefetched)

    @property
    def prefetching(self) -> int:
        """Model loads started by ``prefetch`` that have not ended yet."""
        return len(self._prefetches)

    def _prefetched(self, loading: asyncio.Future[bytes]) -> None:
        self._prefetches.discard(loading)
        if not loading.cancelled() and (exc := loading.exception()) is not None:
            log.info("model prefetch failed (devices will load it themselves): %s", exc)

    async def artifact(self, ref: ObjectRef) -> bytes:
        """Model bytes, verified against ``ref.sha256`` by the store on the first read."""

        async def load() -> bytes:
            obj = await self.calls.run(
                lambda: self.calls.store.get(ref.key, expected_sha256=ref.sha256)
            )
            return bytes(obj.data)

        return await self._artifacts.get(ref.sha256, load)


def _parse(model: type[M], payload: Any, key: str) -> M:
    try:
        return model.model_validate(payload)
    except pydantic.ValidationError as exc:
        log.error("manifest %s is invalid: %s", key, exc)
        raise unavailable("round manifest is unreadable; retry later", 5.0) from exc
