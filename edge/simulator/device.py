"""One simulated phone's life: poll, obey the answer, download, train, upload.

Every network call goes through ``DeviceClient`` (the public protocol); training
goes to the fleet's process pool. Per-round behaviour (offline, dropout, slow)
comes from the device's ``DeviceProfile``, so it is the same in every run with
the same seed.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures.process import BrokenProcessPool

from edge.protocol import DoneAnswer, TaskAnswer, TaskOffer
from edge.simulator.client import (
    TRANSIENT_STATUSES,
    DeviceClient,
    ErrorAnswer,
    TransportFailure,
)
from edge.simulator.fleet import Fleet, RuntimeChoice
from edge.simulator.profiles import DeviceProfile
from edge.simulator.work import FatalTrainingError, TrainReply, TrainRequest, train_in_worker

log = logging.getLogger("canopy.simulator")


def runtimes_for(choice: RuntimeChoice) -> list[str]:
    return ["executorch", "pytorch"] if choice == "auto" else [choice]


async def _train(fleet: Fleet, request: TrainRequest) -> TrainReply:
    loop = asyncio.get_running_loop()
    fleet.training += 1
    try:
        return await loop.run_in_executor(fleet.pool, train_in_worker, request)
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
    weights, program = await _download_model(client, offer)
    s.bytes_downloaded += len(weights) + len(program or b"")
    if profile.drops_out(offer.round):
        # Dropped mid-round (app killed, network lost): no upload, ever, for this task.
        s.dropouts += 1
        s.dropout_events.append((profile.device_id, offer.round))
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
    try:
        reply = await _train(fleet, request)
    except (FatalTrainingError, BrokenProcessPool) as exc:  # no device can train: stop
        fleet.finish("fatal", f"training {fleet.config.job} failed: {exc}")
        return
    except Exception as exc:  # a device whose training fails just does not report
        s.train_failures += 1
        log.warning("device %s: training failed: %s", profile.device_id, exc)
        return
    s.trained += 1
    s.train_seconds += reply.seconds
    s.samples_by_device[profile.device_id] = reply.num_samples
    await fleet.sleep((profile.speed - 1.0) * reply.seconds)  # a slow phone takes longer
    if fleet.stop.is_set():
        return
    await _upload(fleet, client, offer, reply)


async def _upload(fleet: Fleet, client: DeviceClient, offer: TaskOffer, reply: TrainReply) -> None:
    s = fleet.summary
    for _ in range(fleet.config.upload_attempts):
        s.updates_sent += 1
        s.bytes_uploaded += len(reply.update)
        outcome = await client.upload(
            offer, reply.update, num_samples=reply.num_samples, metrics=reply.metrics
        )
        if outcome.code == "accepted":
            s.accepted += 1
        elif outcome.code == "duplicate":
            s.duplicates += 1
        elif outcome.code == "late":
            s.late += 1
        elif outcome.status in TRANSIENT_STATUSES or outcome.status >= 500:
            await fleet.sleep(outcome.retry_after or 1.0)  # not stored: upload again
            continue
        else:
            fleet.rejections[outcome.code] += 1
        return


async def run_device(fleet: Fleet, client: DeviceClient, profile: DeviceProfile) -> None:
    """A phone's life: poll, obey the answer, play the tasks it is given."""
    s = fleet.summary
    handled: set[str] = set()
    backoff = 1.0
    while not fleet.stop.is_set():
        try:
            if not client.enrolled:
                await client.enrol()
                s.enrolled += 1
            s.polls += 1
            answer = await client.poll()
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
            if not profile.online(offer.round):
                s.offline_skips += 1
                handled.add(offer.task_id)
                await fleet.sleep(fleet.config.offline_poll_seconds)
                continue
            s.tasks_received += 1
            handled.add(offer.task_id)
            fleet.active += 1
            try:
                await _play_task(fleet, client, profile, offer)
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
