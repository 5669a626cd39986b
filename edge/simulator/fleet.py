"""What a simulation is asked to do, and the state its device tasks share."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Literal

from edge.protocol import TaskOffer
from edge.simulator.client import DeviceClient
from edge.simulator.summary import SimulationSummary, StopReason
from edge.simulator.trace import Step, StepEvent, Tracer

RuntimeChoice = Literal["auto", "executorch", "pytorch"]


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
    # Long polls (?wait=): a device hears of its task as the round opens, not a pace
    # later. Each held poll keeps a connection, so fleets larger than the connection
    # pools (max_connections x gateways) poll on the gateway's pace instead.
    long_poll_seconds: float = 20.0
    upload_attempts: int = 3  # for 503 answers (the gateway could not store)
    # Devices start spread over this many seconds (device i after i/devices of it), so
    # ten thousand phones do not all open connections and enrol in the same instant.
    ramp_seconds: float = 0.0
    # Enrolments one simulator process has in flight at most (0: no limit). Thousands of
    # phones connecting and enrolling at once on a busy machine time their connections
    # out and retry; a gate lets the rest wait their turn instead.
    max_enrolling: int = 0
    # Devices poll only once every device of this process has enrolled: a scale run's
    # enrolment is not slowed by the idle polls of the thousands already enrolled (each
    # holds a long poll and asks again every ``long_poll_seconds``).
    poll_after_enrolment: bool = False


class Fleet:
    """State shared by the device tasks of one run."""

    def __init__(
        self, config: SimulationConfig, pool: ProcessPoolExecutor, tracer: Tracer | None = None
    ) -> None:
        self.config = config
        self.pool = pool
        self.tracer = tracer
        self.summary = SimulationSummary(job=config.job, devices=config.devices, seed=config.seed)
        self.stop = asyncio.Event()
        self.active = 0
        self.training = 0
        self.first_round: int | None = None
        self.rounds: set[int] = set()
        self.rejections: Counter[str] = Counter()
        self.warming: asyncio.Future[None] | None = None
        self.enrol_gate = (
            asyncio.Semaphore(config.max_enrolling) if config.max_enrolling > 0 else None
        )

        self.everyone_enrolled = asyncio.Event()
        self._enrolled_once: set[str] = set()

    async def enrol(self, client: DeviceClient) -> None:
        """Enrol ``client``, through the gate when the fleet has one; with
        ``poll_after_enrolment``, return only once every device has enrolled."""
        if self.enrol_gate is None:
            await client.enrol()
        else:
            async with self.enrol_gate:
                await client.enrol()
        self._enrolled_once.add(client.device_id)
        if len(self._enrolled_once) >= self.config.devices:
            self.everyone_enrolled.set()
        if self.config.poll_after_enrolment and not self.everyone_enrolled.is_set():
            waiting = asyncio.ensure_future(self.everyone_enrolled.wait())
            stopping = asyncio.ensure_future(self.stop.wait())
            try:
                await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
                stopping.cancel()

    @property
    def poll_wait(self) -> float:
        """How long a device's poll may be held at the gateway (0: answer at once)."""
        pools = self.config.max_connections * len(self.config.gateways)
        if self.config.devices > pools:
            return 0.0
        return min(self.config.long_poll_seconds, self.config.request_timeout / 2)

    def note(
        self,
        device_id: str,
        offer: TaskOffer,
        step: Step,
        *,
        seconds: float | None = None,
        outcome: str | None = None,
    ) -> None:
        """Tell the tracer, if any, that ``device_id`` reached ``step`` of ``offer``."""
        if self.tracer is not None:
            event = StepEvent(
                device_id, offer.task_id, offer.round, step, time.time(), seconds, outcome
            )
            self.tracer(event)

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
