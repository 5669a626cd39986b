"""Play a fleet of simulated devices against the gateways until the job is done.

``run_simulation(config)`` is the library call (``canopy simulate`` and the
flow tests use it, or run the command as a subprocess). One asyncio task per
device does what a phone does: enrol, poll, download, train, upload, obey
retry-after. Training runs in a process pool so both cores work while the event
loop keeps thousands of devices talking HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edge.protocol import DoneAnswer, TaskAnswer, TaskOffer
from edge.simulator.client import (
    DeviceClient,
    ErrorAnswer,
    GatewayPool,
    TransportFailure,
)
from edge.simulator.profiles import DeviceProfile, make_profiles
from edge.simulator.work import (
    FatalTrainingError,
    TrainReply,
    TrainRequest,
    init_worker,
    train_in_worker,
    warm_worker,
)

log = logging.getLogger("canopy.simulator")

RuntimeChoice = Literal["auto", "executorch", "pytorch"]
StopReason = Literal["done", "rounds", "max_seconds", "fatal", "cancelled"]


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate; every random choice follows from ``seed``."""

    job: str
    devices: int
    gateways: list[str]
    seed: int = 0
    runtime: RuntimeChoice = "auto"  # auto: capable of both, trains with the task's runtime
    until_done: bool = True  # False: keep polling after "done", for the job's next run
    rounds: int | None = None  # stop once this many rounds have been seen
    max_seconds: float | None = None
    dropout: float = 0.05
    slow_fraction: float = 0.2
    offline_fraction: float = 0.1
    workers: int = 2
    enrolment_secret: str = "canopy-local-enrolment"
    ca_file: str | None = None
    progress: bool = True
    max_connections: int = 256  # per gateway
    offline_poll_seconds: float = 2.0  # how long an offline device stays away
    request_timeout: float = 60.0
    upload_attempts: int = 3  # for 503 answers (the gateway could not store)


@dataclass
class SimulationSummary:
    """What happened, counted over the whole fleet."""

    job: str
    devices: int
    seed: int
    enrolled: int = 0
    polls: int = 0
    tasks_received: int = 0
    trained: int = 0
    updates_sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    late: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dropouts: int = 0
    offline_skips: int = 0
    train_failures: int = 0
    transport_errors: int = 0
    failovers: int = 0
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    rounds_seen: list[int] = field(default_factory=list)
    stop_reason: StopReason = "cancelled"
    fatal_error: str | None = None
    elapsed_seconds: float = 0.0
    train_seconds: float = 0.0
    dropout_events: list[tuple[str, int]] = field(default_factory=list)
    samples_by_device: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Fleet:
    """State shared by the device tasks of one run."""

    def __init__(self, config: SimulationConfig, pool: ProcessPoolExecutor) -> None:
        self.config = config
        self.pool = pool
        self.summary = SimulationSummary(job=config.job, devices=config.devices, seed=config.seed)
        self.stop = asyncio.Event()
        self.active = 0
        self.training = 0
        self.first_round: int | None = None
        self.rounds: set[int] = set()
        self.rejections: Counter[str] = Counter()
        self.warming: asyncio.Future[None] | None = None

    def finish(self, reason: StopReason, error: str | None = None) -> None:
        if not self.stop.is_set():
            self.summary.stop_reason = reason
            self.summary.fatal_error = error
            self.stop.set()

    def observe_round(self, rnd: int | None) -> None:
        if rnd is None:
            return
        self.rounds.add(rnd)
        if self.first_round is None:
            self.first_round = rnd
        limit = self.config.rounds
        if limit is not None and rnd >= self.first_round + limit:
            self.finish("rounds")

    async def sleep(self, seconds: float) -> None:
        """Sleep, or wake early when the simulation stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=max(seconds, 0.0))


def _runtimes(choice: RuntimeChoice) -> list[str]:
    return ["executorch", "pytorch"] if choice == "auto" else [choice]


async def _train(fleet: _Fleet, request: TrainRequest) -> TrainReply:
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
    fleet: _Fleet, client: DeviceClient, profile: DeviceProfile, offer: TaskOffer
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


async def _upload(fleet: _Fleet, client: DeviceClient, offer: TaskOffer, reply: TrainReply) -> None:
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
        elif outcome.status == 503:
            await fleet.sleep(outcome.retry_after or 1.0)
            continue
        else:
            fleet.rejections[outcome.code] += 1
        return


async def _run_device(fleet: _Fleet, client: DeviceClient, profile: DeviceProfile) -> None:
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
            fleet.rejections[exc.code] += 1
            await fleet.sleep(exc.retry_after or backoff)
            backoff = min(backoff * 2, 15.0)


def _progress_line(fleet: _Fleet, started: float) -> Text:
    s = fleet.summary
    rnd = max(fleet.rounds) if fleet.rounds else "-"
    rejected = sum(fleet.rejections.values())
    return Text.from_markup(
        f"[bold]{fleet.config.job}[/bold] round {rnd} | devices active {fleet.active}"
        f"/{fleet.config.devices} (training {fleet.training}) | updates sent {s.updates_sent} "
        f"| accepted [green]{s.accepted}[/green] | late [yellow]{s.late}[/yellow] "
        f"| rejected [red]{rejected}[/red] | dropouts {s.dropouts} "
        f"| {time.monotonic() - started:.0f}s"
    )


async def _watch(fleet: _Fleet, started: float, console: Console | None) -> None:
    """Refresh the progress line and enforce ``max_seconds``."""
    limit = fleet.config.max_seconds
    live = (
        Live(_progress_line(fleet, started), console=console, refresh_per_second=4)
        if console
        else None
    )
    if live is not None:
        live.start()
    try:
        while not fleet.stop.is_set():
            if limit is not None and time.monotonic() - started >= limit:
                fleet.finish("max_seconds")
                break
            if live is not None:
                live.update(_progress_line(fleet, started))
            await fleet.sleep(0.25)
    finally:
        if live is not None:
            live.update(_progress_line(fleet, started))
            live.stop()


def training_pool(workers: int = 2) -> ProcessPoolExecutor:
    """The process pool devices train in (spawned: torch and threads do not survive fork).

    ``run_simulation`` makes its own unless given one; pass one to reuse warm
    workers across several simulations (tests, benchmarks).
    """
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker)


async def run_simulation(
    config: SimulationConfig, *, pool: ProcessPoolExecutor | None = None
) -> SimulationSummary:
    """Play ``config.devices`` devices until done, ``rounds`` seen, or ``max_seconds``."""
    if not config.gateways:
        raise ValueError("give at least one gateway URL")
    if pool is None:
        own = training_pool(config.workers)
        try:
            return await run_simulation(config, pool=own)
        finally:
            own.shutdown(wait=True, cancel_futures=True)
    profiles = make_profiles(
        config.seed,
        config.devices,
        dropout=config.dropout,
        slow_fraction=config.slow_fraction,
        offline_fraction=config.offline_fraction,
    )
    started = time.monotonic()
    fleet = _Fleet(config, pool)
    gateways = GatewayPool(
        config.gateways,
        verify=config.ca_file or True,
        max_connections=config.max_connections,
        timeout=config.request_timeout,
    )
    clients = [
        DeviceClient(
            gateways,
            device_id=p.device_id,
            home=p.index,
            job=config.job,
            runtimes=_runtimes(config.runtime),
            enrolment_secret=config.enrolment_secret,
        )
        for p in profiles
    ]
    console = Console(stderr=True) if config.progress else None
    # Workers import the training stack (seconds, for ExecuTorch) while devices enrol
    # and poll, not when the first device trains; an unknown job stops the run early.
    fleet.warming = asyncio.ensure_future(_warm(fleet))
    handling_signals = _stop_on_signals(fleet)
    devices = [
        asyncio.ensure_future(_run_device(fleet, c, p))
        for c, p in zip(clients, profiles, strict=True)
    ]
    watcher = asyncio.ensure_future(_watch(fleet, started, console))
    try:
        await _until_stopped(fleet, devices)
    finally:
        fleet.stop.set()
        # Sleeping devices wake up by themselves; the rest are mid-request or queued
        # for training, and a stopped simulation does not wait for them.
        for device in devices:
            device.cancel()
        await asyncio.gather(*devices, watcher, return_exceptions=True)
        if fleet.warming is not None:
            await asyncio.gather(fleet.warming, return_exceptions=True)
        if handling_signals:
            _restore_signals()
        await gateways.aclose()
    summary = fleet.summary
    summary.rejected = dict(fleet.rejections)
    summary.rounds_seen = sorted(fleet.rounds)
    summary.failovers = sum(c.failovers for c in clients)
    summary.dropout_events.sort()
    summary.elapsed_seconds = round(time.monotonic() - started, 3)
    return summary


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_on_signals(fleet: _Fleet) -> bool:
    """SIGINT/SIGTERM end the run cleanly (summary printed, workers stopped)."""
    if threading.current_thread() is not threading.main_thread():
        return False  # only the main thread may install handlers (library use from a thread)
    loop = asyncio.get_running_loop()
    try:
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, fleet.finish, "cancelled")
    except (NotImplementedError, RuntimeError):
        return False
    return True


def _restore_signals() -> None:
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(sig)


async def _warm(fleet: _Fleet) -> None:
    """Import the training stack in every worker; an unknown job or dataset stops the run."""
    loop = asyncio.get_running_loop()
    jobs = [
        loop.run_in_executor(fleet.pool, warm_worker, fleet.config.job)
        for _ in range(fleet.config.workers)
    ]
    try:
        await asyncio.gather(*jobs)
    except (FatalTrainingError, BrokenProcessPool) as exc:
        fleet.finish("fatal", f"cannot train {fleet.config.job}: {exc}")


async def _until_stopped(fleet: _Fleet, devices: list[asyncio.Future[None]]) -> None:
    stop = asyncio.ensure_future(fleet.stop.wait())
    everyone = asyncio.gather(*devices, return_exceptions=True)
    await asyncio.wait({stop, everyone}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()


def print_summary(summary: SimulationSummary, console: Console) -> None:
    """The end-of-run table."""
    table = Table(title=f"simulation of {summary.job}: {summary.stop_reason}", show_header=False)
    rows = [
        ("devices (seed)", f"{summary.devices} ({summary.seed})"),
        ("rounds seen", _rounds(summary.rounds_seen)),
        ("tasks received", summary.tasks_received),
        ("trained / failed", f"{summary.trained} / {summary.train_failures}"),
        ("updates sent", summary.updates_sent),
        ("accepted", summary.accepted),
        ("duplicates", summary.duplicates),
        ("late (409)", summary.late),
        ("rejected", ", ".join(f"{k}={v}" for k, v in sorted(summary.rejected.items())) or "0"),
        ("dropouts", summary.dropouts),
        ("offline skips", summary.offline_skips),
        ("transport errors / failovers", f"{summary.transport_errors} / {summary.failovers}"),
        ("downloaded / uploaded", f"{summary.bytes_downloaded:,} B / {summary.bytes_uploaded:,} B"),
        ("elapsed", f"{summary.elapsed_seconds:.1f} s (training {summary.train_seconds:.1f} s)"),
    ]
    if summary.fatal_error:
        rows.append(("error", f"[red]{summary.fatal_error}[/red]"))
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


def _rounds(rounds: list[int]) -> str:
    if not rounds:
        return "none"
    return f"{rounds[0]}..{rounds[-1]} ({len(rounds)})"
