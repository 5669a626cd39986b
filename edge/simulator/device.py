"""One simulated phone's life: poll, obey the answer, download, train, upload.

An evaluation task (``offer.kind == "evaluate"``) is played the same way,
except that the device evaluates the downloaded weights on its held-out data
instead of training, and uploads metrics only.

Every network call goes through ``DeviceClient`` (the public protocol); training
goes to the fleet's process pool. Per-round behaviour (offline, dropout, slow)
comes from the device's ``DeviceProfile``, so it is the same in every run with
the same seed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from edge.protocol import DoneAnswer, TaskAnswer, TaskOffer
from edge.simulator.client import (
    TRANSIENT_STATUSES,
    DeviceClient,
    ErrorAnswer,
    TransportFailure,
    UploadOutcome,
)
from edge.simulator.fleet import Fleet, RuntimeChoice
from edge.simulator.profiles import DeviceProfile
from edge.simulator.work import (
    EvaluateReply,
    FatalTrainingError,
    TrainReply,
    TrainRequest,
    evaluate_in_worker,
    train_in_worker,
)

log = logging.getLogger("canopy.simulator")
R = TypeVar("R")


def runtimes_for(choice: RuntimeChoice) -> list[str]:
    return ["executorch", "pytorch"] if choice == "auto" else [choice]


async def _in_worker(fleet: Fleet, work: Callable[[TrainRequest], R], request: TrainRequest) -> R:
    loop = asyncio.get_running_loop()
    fleet.training += 1
    try:
        return await loop.run_in_executor(fleet.pool, work, request)
    finally:
        fleet.training -= 1


async def _download_model(client: DeviceClient, offer: TaskOffer) -> tuple[bytes, bytes | None]:
    """(global weights, program): ExecuTorch network jobs also need the .pte."""
    weights = await client.download(offer.weights.url, offer.weights.sha256)
    program = None
    if offer.model.format == "pte":
        program = await client.download(offer.model.url, offer.model.sha256)
    return weights, program


async def _play_task(
    fleet: Fleet, client: DeviceClient, profile: DeviceProfile, offer: TaskOffer
) -> None:
    """One round of one device: download, maybe drop out, train, (slowly) upload."""
    s = fleet.summary
    me = profile.device_id
    evaluating = offer.kind == "evaluate"
    if evaluating:  # the weights are all an evaluation needs
        weights, program = await client.download(offer.weights.url, offer.weights.sha256), None
    else:
        weights, program = await _download_model(client, offer)
    s.bytes_downloaded += len(weights) + len(program or b"")
    fleet.note(me, offer, "downloaded")
    if profile.drops_out(offer.round):
        # Dropped mid-round (app killed, network lost): no upload, ever, for this task.
        s.dropouts += 1
        s.dropout_events.append((me, offer.round))
        fleet.note(me, offer, "dropped")
        return
    request = TrainRequest(
        job=fleet.config.job,
        runtime=offer.runtime,
        device_index=profile.index,
        weights=weights,
        program=program,
        hyperparams=dict(offer.hyperparams),
        data_hint=offer.data_hint,
        fleet_size=fleet.config.devices,
        fleet_seed=fleet.config.seed,
    )
    work = "evaluating" if evaluating else "training"
    reply: TrainReply | EvaluateReply
    fleet.note(me, offer, "training")
    try:
        if evaluating:
            reply = await _in_worker(fleet, evaluate_in_worker, request)
        else:
            reply = await _in_worker(fleet, train_in_worker, request)
    except (FatalTrainingError, BrokenProcessPool) as exc:  # no device can train: stop
        fleet.finish("fatal", f"{work} {fleet.config.job} failed: {exc}")
        return
    except Exception as exc:  # a device whose training fails just does not report
        s.train_failures += 1
        log.warning("device %s: %s failed: %s", me, work, exc)
        fleet.note(me, offer, "failed", outcome="training_failed")
        return
    fleet.note(me, offer, "trained", seconds=reply.seconds)
    await fleet.sleep((profile.speed - 1.0) * reply.seconds)  # a slow phone takes longer
    if fleet.stop.is_set():
        return
    if isinstance(reply, EvaluateReply):
        await _report_evaluation(fleet, client, me, offer, reply)
        return
    s.trained += 1
    s.train_seconds += reply.seconds
    s.samples_by_device[me] = reply.num_samples
    size = len(reply.update)

    async def send() -> UploadOutcome:
        s.updates_sent += 1
        s.bytes_uploaded += size
        return await client.upload(
            offer, reply.update, num_samples=reply.num_samples, metrics=reply.metrics
        )

    if await _upload(fleet, me, offer, send):
        s.accepted += 1


async def _report_evaluation(
    fleet: Fleet, client: DeviceClient, me: str, offer: TaskOffer, reply: EvaluateReply
) -> None:
    """Upload an evaluation's metrics (a device with no held-out data has none to send)."""
    s = fleet.summary
    s.evaluated += 1
    s.train_seconds += reply.seconds
    if reply.num_samples == 0:
        fleet.note(me, offer, "answered", outcome="nothing_to_report")
        return

    async def send() -> UploadOutcome:
        s.evaluations_sent += 1
        return await client.upload_evaluation(
            offer, num_samples=reply.num_samples, metrics=reply.metrics
        )

    if await _upload(fleet, me, offer, send):
        s.evaluations_accepted += 1


async def _upload(
    fleet: Fleet, me: str, offer: TaskOffer, send: Callable[[], Awaitable[UploadOutcome]]
) -> bool:
    """Send until stored or refused for good; True when newly accepted."""
    outcome = await _send_until_final(fleet, me, offer, send)
    fleet.note(me, offer, "answered", outcome=outcome.code)
    return outcome.code == "accepted"


async def _send_until_final(
    fleet: Fleet, me: str, offer: TaskOffer, send: Callable[[], Awaitable[UploadOutcome]]
) -> UploadOutcome:
    """The upload's last answer: stored, refused for good, or the last of the attempts."""
    s = fleet.summary
    outcome = UploadOutcome(0, "not_sent")
    for _ in range(fleet.config.upload_attempts):
        fleet.note(me, offer, "uploading")
        outcome = await send()
        if outcome.code == "accepted":
            pass
        elif outcome.code == "duplicate":
            s.duplicates += 1
        elif outcome.code == "late":
            s.late += 1
        elif outcome.status in TRANSIENT_STATUSES or outcome.status >= 500:
            await fleet.sleep(outcome.retry_after or 1.0)  # not stored: upload again
            continue
        else:
            fleet.rejections[outcome.code] += 1
        return outcome
    return outcome


def _failure_code(exc: TransportFailure | ErrorAnswer) -> str:
    return exc.code if isinstance(exc, ErrorAnswer) else "transport"


async def run_device(fleet: Fleet, client: DeviceClient, profile: DeviceProfile) -> None:
    """A phone's life: poll, obey the answer, play the tasks it is given."""
    s = fleet.summary
    handled: set[str] = set()
    backoff = 1.0
    if fleet.config.ramp_seconds > 0:
        await fleet.sleep(fleet.config.ramp_seconds * profile.index / fleet.config.devices)
    while not fleet.stop.is_set():
        try:
            if not client.enrolled:
                await fleet.enrol(client)
                s.enrolled += 1
            s.polls += 1
            answer = await client.poll(wait=fleet.poll_wait)
            backoff = 1.0
            if isinstance(answer, DoneAnswer):
                fleet.observe_round(answer.round)
                if fleet.config.until_done:
                    fleet.finish("done")
                    return
                await fleet.sleep(fleet.config.offline_poll_seconds)  # wait for the next run
                continue
            if not isinstance(answer, TaskAnswer):
                fleet.observe_round(getattr(answer, "round", None))
                await fleet.sleep(answer.retry_after_seconds)
                continue
            offer = answer.task
            fleet.observe_round(offer.round)
            if offer.task_id in handled:  # already played (another gateway may not know)
                await fleet.sleep(fleet.config.offline_poll_seconds)
                continue
            fleet.note(profile.device_id, offer, "offered")
            if not profile.online(offer.round):
                s.offline_skips += 1
                handled.add(offer.task_id)
                fleet.note(profile.device_id, offer, "offline")
                await fleet.sleep(fleet.config.offline_poll_seconds)
                continue
            s.tasks_received += 1
            handled.add(offer.task_id)
            fleet.active += 1
            try:
                await _play_task(fleet, client, profile, offer)
            except (TransportFailure, ErrorAnswer) as exc:  # the task is lost to this device
                fleet.note(profile.device_id, offer, "failed", outcome=_failure_code(exc))
                raise
            finally:
                fleet.active -= 1
        except TransportFailure:
            s.transport_errors += 1
            await fleet.sleep(backoff)
            backoff = min(backoff * 2, 15.0)
        except ErrorAnswer as exc:
            if exc.permanent:  # the same request would be refused forever: say so and stop
                fleet.finish(
                    "fatal",
                    f"device {profile.device_id}: {exc.operation} refused with HTTP "
                    f"{exc.status} {exc.code}: {exc.message} (not retryable; check the "
                    "enrolment secret, the job and the gateway URLs)",
                )
                return
            fleet.rejections[exc.code] += 1
            await fleet.sleep(exc.retry_after or backoff)
            backoff = min(backoff * 2, 15.0)
