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
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from rich.console import Console
from rich.live import Live
from rich.text import Text

from edge.simulator.client import DeviceClient, GatewayPool
from edge.simulator.device import run_device, runtimes_for
from edge.simulator.fleet import Fleet, SimulationConfig
from edge.simulator.profiles import make_profiles
from edge.simulator.summary import SimulationSummary
from edge.simulator.work import FatalTrainingError, init_worker, warm_worker

log = logging.getLogger("canopy.simulator")


def _progress_line(fleet: Fleet, started: float) -> Text:
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


async def _watch(fleet: Fleet, started: float, console: Console | None) -> None:
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
    fleet = Fleet(config, pool)
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
            runtimes=runtimes_for(config.runtime),
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
        asyncio.ensure_future(run_device(fleet, c, p))
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


def _stop_on_signals(fleet: Fleet) -> bool:
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


async def _warm(fleet: Fleet) -> None:
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


async def _until_stopped(fleet: Fleet, devices: list[asyncio.Future[None]]) -> None:
    stop = asyncio.ensure_future(fleet.stop.wait())
    everyone = asyncio.gather(*devices, return_exceptions=True)
    await asyncio.wait({stop, everyone}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
