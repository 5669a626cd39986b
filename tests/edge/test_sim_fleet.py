"""The simulator end to end: hello-mobile devices against gateway processes and moto.

A small stand-in for the round flow (a thread writing manifests and reading
update batches, nothing else) drives rounds, so the test checks exactly what
the simulator promises: devices speak only HTTP, the right devices report in
each round, dropouts and offline rounds follow the seed, and a second run with
the same seed reproduces the first.

The stand-in closes a round only once every selected device is done with its
task, as the simulator's trace (``edge.simulator.trace``) tells: skipped it
(offline), dropped out after the download, or had its upload answered. Closing
when the expected reports are in is not enough: a slow device that had not yet
taken its task would then never drop out, and one taking it during the close
would be refused its download.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from aggregation.tensors import TensorDict
from edge.manifests import DataHint
from edge.simulator import (
    SimulationConfig,
    SimulationSummary,
    make_profiles,
    run_simulation,
    training_pool,
)
from edge.simulator.trace import StepEvent
from edge.simulator.work import warm_worker
from edge.update_batch import DeviceUpdate, decode_update_batch
from infra.keys import updates_prefix
from infra.settings import GatewaySettings, S3Settings
from infra.store import S3ObjectStore
from tests.support.harness import (
    GatewayProcess,
    free_port,
    read_active,
    set_round_status,
    write_round,
)
from tests.support.stack import fresh_bucket

JOB = "hello-mobile"
DEVICES, ROUNDS, PER_ROUND = 24, 2, 10
LEAVES = ["leaf-0", "leaf-1"]
PROFILE_ARGS = {"dropout": 0.25, "slow_fraction": 0.3, "offline_fraction": 0.3}
HINT = DataHint(scheme="iid", num_devices=DEVICES, seed=11, min_size=2)


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPoolExecutor]:
    """One warm training worker for the module: importing the training stack costs seconds.

    One worker, not two: hello-mobile trains in microseconds, and a second import
    of ExecuTorch would only compete with the gateways for the CPU.
    """
    with training_pool(1) as shared:
        shared.submit(warm_worker, JOB).result(timeout=240)
        yield shared


def selected_for(rnd: int) -> list[str]:
    ids = [p.device_id for p in make_profiles(5, DEVICES, **PROFILE_ARGS)]
    return sorted(random.Random(rnd).sample(ids, PER_ROUND))


def expected_reports(rnd: int) -> set[str]:
    """Selected devices that are online in the round and do not drop out of it."""
    chosen = set(selected_for(rnd))
    return {
        p.device_id
        for p in make_profiles(5, DEVICES, **PROFILE_ARGS)
        if p.device_id in chosen and p.online(rnd) and not p.drops_out(rnd)
    }


class StandInFlow(threading.Thread):
    """Opens rounds, waits until every selected device is done with its task, applies
    the reports' mean, ends the job.

    ``trace`` is given to the simulation: it records, from the simulator's event loop,
    which devices are done with which round's task.
    """

    def __init__(self, store: S3ObjectStore, run_id: str) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.run_id = run_id
        self.reports: dict[int, list[DeviceUpdate]] = {}
        self.error: BaseException | None = None
        self._done: dict[int, set[str]] = defaultdict(set)
        self._progress = threading.Condition()

    def trace(self, event: StepEvent) -> None:
        if event.final:
            with self._progress:
                self._done[event.round].add(event.device_id)
                self._progress.notify_all()

    def wait_until_done_with(self, rnd: int, devices: set[str], timeout: float) -> None:
        """Until each of ``devices`` has finished round ``rnd``'s task, one way or another."""
        with self._progress:
            if not self._progress.wait_for(lambda: devices <= self._done[rnd], timeout):
                missing = sorted(devices - self._done[rnd])
                raise TimeoutError(f"round {rnd}: {missing} never finished their task")

    def stored(self, rnd: int) -> list[DeviceUpdate]:
        out = []
        for leaf in LEAVES:
            for key in self.store.list_keys(updates_prefix(JOB, self.run_id, rnd, leaf)):
                out += decode_update_batch(self.store.get(key).data, key)
        return out

    def run(self) -> None:
        try:
            state: TensorDict = {"vector": np.zeros(256, np.float32)}
            for rnd in range(ROUNDS):
                write_round(
                    self.store,
                    job=JOB,
                    run_id=self.run_id,
                    rnd=rnd,
                    leaves=LEAVES,
                    selected=selected_for(rnd),
                    state=state,
                    runtime="executorch",
                    hyperparams={"lr": 0.5, "batch_size": 16, "seed": rnd},
                    data_hint=HINT,
                    poll_seconds=0.2,
                    idle_poll_seconds=0.4,
                    deadline_seconds=90,
                )
                self.wait_until_done_with(rnd, set(selected_for(rnd)), timeout=60)
                # Close, then list: the gateways' close fence makes that complete, no sleep.
                set_round_status(self.store, read_active(self.store, JOB), "closed")
                # Sorted: the float sum must not depend on the order uploads arrived in.
                self.reports[rnd] = sorted(self.stored(rnd), key=lambda u: u.device_id)
                total = sum(u.num_samples for u in self.reports[rnd])
                mean = sum(u.tensors["vector"] * u.num_samples for u in self.reports[rnd]) / total
                state = {"vector": (state["vector"] + mean).astype(np.float32)}
            set_round_status(self.store, read_active(self.store, JOB), "done")
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def simulate(
    s3_settings: S3Settings, pool: ProcessPoolExecutor
) -> tuple[SimulationSummary, StandInFlow]:
    store = S3ObjectStore(s3_settings)
    settings = GatewaySettings(manifest_cache_seconds=0.1, group_commit_max_wait_ms=20)
    with (
        GatewayProcess(s3_settings, settings, gateway_id="gw-one") as one,
        GatewayProcess(s3_settings, settings, gateway_id="gw-two") as two,
    ):
        flow = StandInFlow(store, run_id="run-" + uuid.uuid4().hex[:6])
        flow.start()
        config = SimulationConfig(
            job=JOB,
            devices=DEVICES,
            gateways=[one.url, two.url],
            seed=5,
            workers=1,
            progress=False,
            max_seconds=100,
            offline_poll_seconds=0.3,
            **PROFILE_ARGS,
        )
        summary = asyncio.run(run_simulation(config, pool=pool, trace=flow.trace))
        flow.join(timeout=10)
    if flow.error is not None:
        raise flow.error
    return summary, flow


def test_fleet_plays_rounds_reproducibly(moto_endpoint: str, pool: ProcessPoolExecutor) -> None:
    # Prepare and execute: two buckets, so the two runs share nothing but the seed.
    first, flow_a = simulate(fresh_bucket(moto_endpoint, "sim"), pool)
    second, flow_b = simulate(fresh_bucket(moto_endpoint, "sim"), pool)

    # Assert: each round got exactly the expected reports, once each.
    profiles = make_profiles(5, DEVICES, **PROFILE_ARGS)
    for rnd in range(ROUNDS):
        reported = [u.device_id for u in flow_a.reports[rnd]]
        assert sorted(reported) == sorted(expected_reports(rnd))
    expected_dropouts = sorted(
        (p.device_id, rnd)
        for rnd in range(ROUNDS)
        for p in profiles
        if p.device_id in selected_for(rnd) and p.online(rnd) and p.drops_out(rnd)
    )
    offline = sum(
        1
        for rnd in range(ROUNDS)
        for p in profiles
        if p.device_id in selected_for(rnd) and not p.online(rnd)
    )
    assert first.stop_reason == "done" and first.fatal_error is None
    assert first.dropout_events == expected_dropouts and expected_dropouts
    assert first.offline_skips == offline
    assert first.accepted == sum(len(expected_reports(r)) for r in range(ROUNDS))
    assert first.late == 0 and first.rejected == {} and first.enrolled == DEVICES
    assert first.rounds_seen == list(range(ROUNDS))
    # Each device trains its own fixed partition: the same size in every round.
    sizes = {}
    for rnd in range(ROUNDS):
        for u in flow_a.reports[rnd]:
            assert sizes.setdefault(u.device_id, u.num_samples) == u.num_samples
            assert u.metrics.keys() >= {"loss"}
    assert sizes == first.samples_by_device

    # Assert: the second run with the same seed is the same simulation.
    for field in (
        "dropout_events",
        "samples_by_device",
        "accepted",
        "offline_skips",
        "rounds_seen",
    ):
        assert getattr(second, field) == getattr(first, field), field
    for rnd in range(ROUNDS):
        a = {u.device_id: u.tensors["vector"] for u in flow_a.reports[rnd]}
        b = {u.device_id: u.tensors["vector"] for u in flow_b.reports[rnd]}
        assert a.keys() == b.keys()
        for device in a:
            np.testing.assert_array_equal(a[device], b[device])


async def test_unknown_job_stops_the_simulation(
    s3_store: S3ObjectStore, s3_settings: S3Settings, pool: ProcessPoolExecutor
) -> None:
    write_round(
        s3_store,
        job="no-such-job",
        run_id="r",
        rnd=0,
        leaves=LEAVES,
        selected=[],
        state={"vector": np.zeros(4, np.float32)},
    )
    with GatewayProcess(s3_settings, GatewaySettings()) as gw:
        summary = await run_simulation(
            SimulationConfig(
                job="no-such-job", devices=3, gateways=[gw.url], progress=False, max_seconds=60
            ),
            pool=pool,
        )

    assert summary.stop_reason == "fatal"
    assert summary.fatal_error is not None and "no-such-job" in summary.fatal_error


@pytest.mark.parametrize(
    ("secret", "status_code"),
    [
        ("not-the-fleet-secret", "HTTP 401 bad_enrolment_secret"),
        ("x" * 600, "HTTP 422 bad_request"),
    ],
)
async def test_a_permanent_refusal_stops_the_simulation_with_its_reason(
    s3_settings: S3Settings, pool: ProcessPoolExecutor, secret: str, status_code: str
) -> None:
    with GatewayProcess(s3_settings, GatewaySettings()) as gw:
        started = time.monotonic()
        summary = await run_simulation(
            SimulationConfig(
                job=JOB,
                devices=4,
                gateways=[gw.url],
                progress=False,
                max_seconds=60,
                enrolment_secret=secret,
            ),
            pool=pool,
        )
        elapsed = time.monotonic() - started

    assert summary.stop_reason == "fatal" and summary.enrolled == 0 and summary.polls == 0
    assert summary.fatal_error is not None and status_code in summary.fatal_error
    assert "not retryable" in summary.fatal_error and "enrolment" in summary.fatal_error
    assert elapsed < 20  # not 350 tries in 51 s


async def test_an_unreachable_gateway_is_retried_until_the_time_is_up(
    pool: ProcessPoolExecutor,
) -> None:
    summary = await run_simulation(
        SimulationConfig(
            job=JOB,
            devices=2,
            gateways=[f"http://127.0.0.1:{free_port()}"],
            progress=False,
            max_seconds=3,
        ),
        pool=pool,
    )

    assert summary.stop_reason == "max_seconds" and summary.fatal_error is None
    assert 2 <= summary.transport_errors <= 10  # backing off (1 s, 2 s, ...), not hammering
