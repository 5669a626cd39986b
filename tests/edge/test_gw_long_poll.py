"""Long polls (``?wait=``): a poll with nothing to offer waits for the round to move.

Real HTTP against a gateway thread over the moto server; the round is opened and
closed by writing the manifests, as the round flow does.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from edge.gateway.tuning import GatewayTuning
from edge.gateway.watch import RoundWatch, next_read_in, round_mark
from edge.manifests import ActiveRound
from infra.store import S3ObjectStore
from tests.edge.devices import JOB, Device, devices_on, gateway_settings, open_test_round
from tests.support.harness import GatewayThread, read_active, set_round_status


def held_poll(device: Device, wait: float) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = device.client.get(
        f"/v1/jobs/{JOB}/devices/{device.device_id}/task",
        params={"wait": wait},
        headers=device.auth,
    )
    return response, time.monotonic() - started


def test_a_held_poll_answers_with_the_task_as_the_round_opens(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    # Prepare: an enrolled device, no run of the job yet.
    device = Device(client, devices_on("leaf-0", 1)[0])
    assert device.enrol().status_code == 200

    # Execute: it long-polls; the round opens 0.6 s later.
    with ThreadPoolExecutor(1) as pool:
        polling = pool.submit(held_poll, device, 10.0)
        time.sleep(0.6)
        opened_at = time.monotonic()
        tasks = open_test_round(s3_store, [device.device_id])
        response, _ = polling.result(timeout=15)
        heard_after = time.monotonic() - opened_at

    # Assert: the held poll carried the task, well before its 10 s were up.
    assert response.status_code == 200
    answer = response.json()
    assert answer["status"] == "task", answer
    assert answer["task"]["task_id"] == tasks["leaf-0"].task_id
    assert heard_after < 3.0


def test_a_hold_that_runs_out_says_ask_again_now(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    a, idle = devices_on("leaf-0", 2)
    devices = [Device(client, d) for d in (a, idle)]
    for device in devices:
        device.enrol()
    open_test_round(s3_store, [a])

    response, took = held_poll(devices[1], 0.8)

    assert response.json()["status"] == "retry"
    assert response.json()["reason"] == "not_selected"
    assert response.json()["retry_after_seconds"] == 0
    assert response.headers["Retry-After"] == "0"
    assert 0.7 <= took < 5.0


def test_a_held_poll_hears_the_round_close(s3_store: S3ObjectStore, client: httpx.Client) -> None:
    a, idle = devices_on("leaf-0", 2)
    devices = [Device(client, d) for d in (a, idle)]
    for device in devices:
        device.enrol()
    open_test_round(s3_store, [a])
    active = read_active(s3_store, JOB)

    with ThreadPoolExecutor(1) as pool:
        polling = pool.submit(held_poll, devices[1], 10.0)
        time.sleep(0.5)
        set_round_status(s3_store, active, "done")
        response, took = polling.result(timeout=15)

    assert response.json()["status"] == "done"
    assert took < 5.0


def test_a_nudge_wakes_held_polls_without_waiting_for_the_watch(s3_store: S3ObjectStore) -> None:
    # Prepare: a gateway that reads a watched round only once a minute by itself
    slow = GatewayTuning(watch_interval_seconds=60.0, watch_soon_interval_seconds=60.0)
    with (
        GatewayThread(gateway_settings(), s3_store, tuning=slow) as gw,
        httpx.Client(base_url=gw.url, timeout=30) as client,
    ):
        device = Device(client, devices_on("leaf-0", 1)[0])
        assert device.enrol().status_code == 200
        nobody = client.post(f"/v1/jobs/{JOB}/wake")
        with ThreadPoolExecutor(1) as pool:
            polling = pool.submit(held_poll, device, 20.0)
            while not client.post(f"/v1/jobs/{JOB}/wake").json()["watching"]:
                time.sleep(0.02)  # until the poll is held (its watch has read "no job")

            # Execute: the round opens, and whoever opened it says so
            tasks = open_test_round(s3_store, [device.device_id])
            woken = client.post(f"/v1/jobs/{JOB}/wake")
            response, took = polling.result(timeout=30)

    # Assert: the held poll got its task long before the watch's own minute was up
    assert nobody.status_code == 202 and nobody.json() == {
        "status": "ok",
        "job": JOB,
        "watching": False,
    }
    assert woken.status_code == 202 and woken.json()["watching"] is True
    assert response.json()["status"] == "task"
    assert response.json()["task"]["task_id"] == tasks["leaf-0"].task_id
    assert took < 20.0  # answered by the nudge, not by the hold running out


@pytest.mark.parametrize("job", ["a..b", "-x", "a" * 129, "a b"])
def test_a_nudge_for_an_impossible_job_is_a_422(client: httpx.Client, job: str) -> None:
    response = client.post(f"/v1/jobs/{job}/wake")

    assert response.status_code == 422 and response.json()["code"] == "bad_request"


async def test_nudges_never_read_faster_than_the_soon_interval() -> None:
    reads = 0

    async def read(job: str) -> ActiveRound | None:
        nonlocal reads
        reads += 1
        return _active(2)

    watch = RoundWatch(read, interval=60.0, min_gap=0.1)
    waiting = asyncio.ensure_future(watch.wait_change(JOB, round_mark(_active(2)), 0.55))
    await asyncio.sleep(0)  # the poll is held
    nudges = 0
    while not waiting.done():  # a flood of nudges for as long as the poll is held
        nudges += watch.nudge(JOB)
        await asyncio.sleep(0.002)
    assert await waiting is False and nudges > 50

    assert 2 <= reads <= 7  # about one per 0.1 s, not one per nudge
    await watch.close()


@pytest.mark.parametrize("wait", ["-1", "26", "nan", "inf", "soon"])
def test_a_bad_wait_is_a_422(client: httpx.Client, wait: str) -> None:
    device = Device(client, devices_on("leaf-0", 1)[0])
    device.enrol()

    response = client.get(
        f"/v1/jobs/{JOB}/devices/{device.device_id}/task",
        params={"wait": wait},
        headers=device.auth,
    )

    assert response.status_code == 422
    assert response.json()["code"] == "bad_request"
    assert "wait" in response.json()["message"]


def test_the_openapi_document_states_the_wait_limit(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    poll = spec["paths"]["/v1/jobs/{job}/devices/{device_id}/task"]["get"]
    wait = next(p for p in poll["parameters"] if p["name"] == "wait")
    assert wait["schema"] == {"type": "number", "minimum": 0, "maximum": 25.0}


# --- the watch itself: one read per interval, whatever the number of waiters ---------------


def _active(rnd: int, status: str = "open", closed_at: datetime | None = None) -> ActiveRound:
    return ActiveRound.model_validate(
        {
            "job": JOB,
            "run_id": "r",
            "round": rnd,
            "status": status,
            "leaves": ["leaf-0"],
            "leaf_manifest_keys": {"leaf-0": "k"},
            "opened_at": "2026-01-01T00:00:00Z",
            "closed_at": closed_at,
            "poll_seconds": 1.0,
            "idle_poll_seconds": 2.0,
        }
    )


NOW = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("active", "expected"),
    [
        (None, 0.1),  # no run yet
        (_active(3), 0.1),  # open: what waiters wait for is the close, not urgent
        (_active(3, "closed", NOW - timedelta(seconds=2)), 0.02),  # the next open is imminent
        (_active(3, "closed", NOW + timedelta(seconds=1)), 0.02),  # the flow's clock is ahead
        (_active(3, "closed", NOW - timedelta(seconds=30)), 0.1),  # a flow that went away
        (_active(3, "done", NOW - timedelta(seconds=1)), 0.1),  # finished: no next round
    ],
)
def test_the_watch_reads_fast_only_in_the_window_after_a_close(
    active: ActiveRound | None, expected: float
) -> None:
    pause = next_read_in(active, NOW, interval=0.1, soon_interval=0.02, soon_window=10.0)
    assert pause == expected


async def test_after_a_close_the_watch_reads_at_the_soon_interval() -> None:
    reads = 0

    async def read(job: str) -> ActiveRound | None:
        nonlocal reads
        reads += 1
        return _active(4, "closed", datetime.now(UTC))

    watch = RoundWatch(read, interval=5.0, soon_interval=0.01, soon_window=10.0)
    seen = round_mark(_active(4, "closed"))
    assert await watch.wait_change(JOB, seen, 0.5) is False

    assert reads >= 5  # at the 5 s interval it would have read once
    await watch.close()


async def test_many_waiters_share_one_read_per_interval_and_all_wake() -> None:
    current = {"active": _active(0)}
    reads = 0

    async def read(job: str) -> ActiveRound | None:
        nonlocal reads
        reads += 1
        return current["active"]

    watch = RoundWatch(read, interval=0.05)
    seen = round_mark(current["active"])
    waiters = [asyncio.ensure_future(watch.wait_change(JOB, seen, 5.0)) for _ in range(200)]
    await asyncio.sleep(0.3)
    current["active"] = _active(1)
    woke = await asyncio.wait_for(asyncio.gather(*waiters), 2.0)

    assert woke == [True] * 200
    assert reads < 20  # about one per 0.05 s, not one per waiter
    await watch.close()


async def test_a_stale_mark_wakes_at_once_and_a_quiet_round_times_out() -> None:
    async def read(job: str) -> ActiveRound | None:
        return _active(3)

    watch = RoundWatch(read, interval=0.05)
    assert await watch.wait_change(JOB, round_mark(_active(2)), 2.0) is True
    started = time.monotonic()
    assert await watch.wait_change(JOB, round_mark(_active(3)), 0.2) is False
    assert time.monotonic() - started >= 0.2
    await watch.close()
