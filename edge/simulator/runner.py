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
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from edge.simulator.client import DeviceClient, GatewayPool
from edge.simulator.device import run_device, runtimes_for
from edge.simulator.fleet import Fleet, SimulationConfig
from edge.simulator.profiles import make_profiles
from edge.simulator.summary import SimulationSummary
from edge.simulator.trace import Tracer
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
    config: SimulationConfig,
    *,
    pool: ProcessPoolExecutor | None = None,
    trace: Tracer | None = None,
) -> SimulationSummary:
    """Play ``config.devices`` devices until done, ``rounds`` seen, or ``max_seconds``.

    ``trace`` is called with every step each device takes (``edge.simulator.trace``).
    """
    if not config.gateways:
        raise ValueError("give at least one gateway URL")
    if pool is None:
        own = training_pool(config.workers)
        try:
            return await run_simulation(config, pool=own, trace=trace)
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
    fleet = Fleet(config, pool, trace)
    gateways = GatewayPool(
        config.gateways,
        verify=config.ca_file or True,
        max_connections=config.max_connections,
        timeout=config.request_timeout,
    )
    console = Console(stderr=True) if config.progress else None
    # Workers import the training stack (seconds, for ExecuTorch) while devices enrol
    # and poll, not when the first device trains; an unknown job stops the run early.
    names: list[str] = []
    fleet.warming = asyncio.ensure_future(_warm(fleet, names))
    handling_signals = _stop_on_signals(fleet)
    watcher = asyncio.ensure_future(_watch(fleet, started, console))
    clients: list[DeviceClient] = []
    devices: list[asyncio.Future[None]] = []
    try:
        job = await _protocol_job(fleet, names)
        if job is not None:  # None: the job cannot be loaded (fatal) or the run was stopped
            clients = [
                DeviceClient(
                    gateways,
                    device_id=p.device_id,
                    home=p.index,
                    job=job,
                    runtimes=runtimes_for(config.runtime),
                    enrolment_secret=config.enrolment_secret,
                )
                for p in profiles
            ]
            devices = [
                asyncio.ensure_future(run_device(fleet, c, p))
                for c, p in zip(clients, profiles, strict=True)
            ]
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


async def _warm(fleet: Fleet, names: list[str]) -> None:
    """Import the training stack in every worker; an unknown job or dataset stops the run.

    ``names`` receives the job's declared name as each worker resolved it.
    """
    loop = asyncio.get_running_loop()
    jobs = [
        loop.run_in_executor(fleet.pool, warm_worker, fleet.config.job)
        for _ in range(fleet.config.workers)
    ]
    try:
        names.extend(await asyncio.gather(*jobs))
    except (FatalTrainingError, BrokenProcessPool) as exc:
        fleet.finish("fatal", f"cannot train {fleet.config.job}: {exc}")


def declared_name(reference: str) -> str | None:
    """The job's name when ``reference`` already is one, else None (it must be imported).

    Job names are key segments and never contain ``:``, while ``module:ATTR`` and
    ``file.py:ATTR`` references always do; so a built-in name is known here without
    importing the job, which would import torch into this networking-only process.
    """
    return None if ":" in reference else reference


async def _protocol_job(fleet: Fleet, names: list[str]) -> str | None:
    """The job's declared name, which devices enrol and poll under (a gateway routes
    by name; the reference is what workers import).

    For a ``module:ATTR`` or ``file.py:ATTR`` reference that means waiting for the
    warm-up, whose workers import the job. None when the warm-up failed (the run
    is already finished as fatal) or the run was stopped first.
    """
    name = declared_name(fleet.config.job)
    if name is not None:
        return name
    assert fleet.warming is not None
    stopped = asyncio.ensure_future(fleet.stop.wait())
    await asyncio.wait({fleet.warming, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if fleet.stop.is_set() or not names:
        return None
    if len(set(names)) != 1:  # the file changed between the workers' imports
        fleet.finish("fatal", f"{fleet.config.job} resolved to different names {sorted(names)}")
        return None
    log.info("job %s is %s", fleet.config.job, names[0])
    return names[0]


async def _until_stopped(fleet: Fleet, devices: Sequence[asyncio.Future[None]]) -> None:
    stop = asyncio.ensure_future(fleet.stop.wait())
    everyone = asyncio.gather(*devices, return_exceptions=True)
    waiting: set[asyncio.Future[Any]] = {stop, everyone}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
