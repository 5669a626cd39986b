"""The device protocol end to end: real HTTP on loopback, a moto S3 server behind.

Each test writes the round manifests itself, as the round flow would, starts a
gateway (uvicorn in a thread) and plays devices with httpx.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np

from aggregation.tensors import TensorDict, decode_tensors, encode_tensors
from edge.gateway import GatewayTuning
from edge.manifests import DeviceRecord, device_key
from edge.routing import leaf_for_device
from edge.update_batch import decode_update_batch
from infra.lineage import read_lineage
from infra.store import ObjectRef, S3ObjectStore, get_json, put_json
from tests.edge.devices import (
    JOB,
    LEAVES,
    RUN,
    STATE,
    Device,
    batches,
    devices_on,
    enrol_async,
    error,
    gateway_settings,
    offered_device,
    open_test_round,
    update_like,
)
from tests.support.harness import GatewayThread, read_active, set_round_status

# --- the happy path ----------------------------------------------------------------------


def test_a_round_over_http(s3_store: S3ObjectStore, client: httpx.Client) -> None:
    # Prepare: two selected devices (one per leaf), one enrolled but not selected.
    a, b = devices_on("leaf-0", 1)[0], devices_on("leaf-1", 1)[0]
    idle = devices_on("leaf-0", 2, prefix="idle")[1]
    devices = {d: Device(client, d) for d in (a, b, idle)}
    for device in devices.values():
        assert device.enrol().status_code == 200
    tasks = open_test_round(s3_store, [a, b])

    # Execute
    offers = {d: devices[d].offer() for d in (a, b)}
    idle_answer = devices[idle].poll()
    download = client.get(str(offers[a]["model"]["url"]), headers=devices[a].auth)  # type: ignore[index]
    ranged = client.get(
        str(offers[a]["model"]["url"]),  # type: ignore[index]
        headers={**devices[a].auth, "Range": "bytes=8-"},
    )
    receipts = {d: devices[d].upload(offers[d], update_like(i + 1.0)) for i, d in enumerate((a, b))}
    again = devices[a].poll().json()

    # Assert: offers, pacing, download integrity
    assert offers[a]["task_id"] == tasks["leaf-0"].task_id and offers[a]["leaf"] == "leaf-0"
    assert offers[b]["task_id"] == tasks["leaf-1"].task_id
    assert offers[a]["model"]["format"] == "safetensors"  # type: ignore[index]
    assert idle_answer.json()["status"] == "retry"
    assert idle_answer.json()["reason"] == "not_selected"
    assert int(idle_answer.headers["Retry-After"]) >= 1
    assert download.status_code == 200
    assert download.headers["X-Canopy-Sha256"] == tasks["leaf-0"].global_model.sha256
    assert decode_tensors(download.content)[0].keys() == STATE.keys()
    assert ranged.status_code == 206 and ranged.content == download.content[8:]
    assert (
        ranged.headers["Content-Range"]
        == f"bytes 8-{len(download.content) - 1}/{len(download.content)}"
    )
    assert again == {**again, "status": "retry", "reason": "already_submitted"}

    # Assert: acknowledged updates are in S3, decodable, with lineage
    for i, d in enumerate((a, b)):
        receipt = receipts[d].json()
        assert receipts[d].status_code == 200 and receipt["duplicate"] is False
        leaf = leaf_for_device(d, LEAVES)
        [key] = batches(s3_store, leaf)
        [update] = decode_update_batch(s3_store.get(key).data, source=key)
        assert (update.device_id, update.num_samples, update.metrics) == (d, 12, {"loss": 0.5})
        assert update.task_id == tasks[leaf].task_id and update.gateway_id == "gw-test"
        np.testing.assert_array_equal(update.tensors["w"], np.full((4, 3), i + 1.0, np.float32))
        record = read_lineage(s3_store, key)
        assert record is not None and record.kind == "device-update-batch"
        assert record.inputs[0].sha256 == tasks[leaf].global_model.sha256
        assert record.parameters["device_ids"] == [d]
    registered = DeviceRecord.model_validate(get_json(s3_store, device_key(JOB, idle)))
    assert registered.runtimes == ["pytorch"] and registered.gateway_id == "gw-test"


def test_executorch_devices_get_the_program(s3_store: S3ObjectStore, client: httpx.Client) -> None:
    phone, laptop = devices_on("leaf-0", 2)
    et, pt = Device(client, phone, ("executorch",)), Device(client, laptop, ("pytorch",))
    et.enrol(), pt.enrol()
    program = b"PTE-PROGRAM-BYTES" * 100
    open_test_round(s3_store, [phone, laptop], runtime="executorch", program=program)

    et_offer, pt_offer = et.offer(), pt.offer()
    pte = client.get(str(et_offer["model"]["url"]), headers=et.auth)  # type: ignore[index]
    weights = client.get(str(pt_offer["model"]["url"]), headers=pt.auth)  # type: ignore[index]

    assert et_offer["runtime"] == "executorch" and pt_offer["runtime"] == "pytorch"
    assert pte.content == program and pte.headers["X-Canopy-Model-Format"] == "pte"
    assert weights.headers["X-Canopy-Model-Format"] == "safetensors"


def test_no_job_done_and_no_program(s3_store: S3ObjectStore, client: httpx.Client) -> None:
    device = Device(client, devices_on("leaf-0", 1)[0])
    device.enrol()

    before = device.poll().json()
    open_test_round(s3_store, [device.device_id])
    offer = device.offer()
    missing = client.get(
        str(offer["model"]["url"]).replace("format=safetensors", "format=pte"),  # type: ignore[index]
        headers=device.auth,
    )
    set_round_status(s3_store, read_active(s3_store, JOB), "done")
    after = device.poll().json()

    assert before["status"] == "no_job" and before["retry_after_seconds"] > 0
    assert error(missing) == (404, "no_program")
    assert after["status"] == "done" and after["run_id"] == RUN


# --- authentication ----------------------------------------------------------------------


def test_authentication_failures(s3_store: S3ObjectStore, client: httpx.Client) -> None:
    open_test_round(s3_store, [])
    alice, bob = Device(client, "alice"), Device(client, "bob")
    alice.enrol()
    url = f"/v1/jobs/{JOB}/devices/alice/task"

    no_token = client.get(url)
    not_bearer = client.get(url, headers={"Authorization": "Basic abc"})
    forged = client.get(url, headers={"Authorization": f"Bearer {alice.token[:-3]}xyz"})
    someone_else = client.get(f"/v1/jobs/{JOB}/devices/bob/task", headers=alice.auth)
    wrong_secret = bob.enrol(secret="guess")
    bad_body = client.post(
        "/v1/enrol", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    bad_id = Device(client, "../etc").enrol()
    # bob enrols for another job only: his token is valid but he is unknown to JOB.
    bob.enrol(job="other-job")
    unknown = bob.poll()
    s3_store.delete(device_key(JOB, "alice"))  # a revoked device, once the gateway re-checks
    still_cached = alice.poll()

    assert error(no_token) == (401, "missing_token")
    assert error(not_bearer) == (401, "missing_token")
    assert error(forged) == (401, "bad_token")
    assert error(someone_else) == (403, "device_mismatch")
    assert error(wrong_secret) == (401, "bad_enrolment_secret")
    assert error(bad_body) == (422, "bad_request")
    assert error(bad_id) == (422, "bad_request")
    assert error(unknown) == (404, "unknown_device")
    assert still_cached.json()["reason"] == "not_selected"  # registry answers are cached


# --- validation at the door ----------------------------------------------------------


BAD_UPDATES: list[tuple[str, TensorDict | bytes, dict[str, str], int, str, str | None]] = [
    ("missing tensor", {"w": np.zeros((4, 3), np.float32)}, {}, 422, "tensor_names", "b"),
    (
        "extra tensor",
        {**update_like(0.0), "z": np.zeros(1, np.float32)},
        {},
        422,
        "tensor_names",
        "z",
    ),
    (
        "shape",
        {**update_like(0.0), "w": np.zeros((3, 4), np.float32)},
        {},
        422,
        "tensor_shape",
        "w",
    ),
    ("dtype", {**update_like(0.0), "b": np.zeros(3, np.float64)}, {}, 422, "tensor_dtype", "b"),
    (
        "nan",
        {**update_like(0.0), "w": np.full((4, 3), np.nan, np.float32)},
        {},
        422,
        "non_finite",
        "w",
    ),
    (
        "inf",
        {**update_like(0.0), "b": np.array([0, np.inf, 0], np.float32)},
        {},
        422,
        "non_finite",
        "b",
    ),
    ("garbage body", b"\x00\x01not safetensors at all", {}, 422, "malformed_update", None),
    (
        "pickle body",
        b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00.",
        {},
        422,
        "malformed_update",
        None,
    ),
    (
        "json floats",
        b"[0.1, 0.2]",
        {"Content-Type": "application/json"},
        415,
        "unsupported_media_type",
        None,
    ),
    ("no samples", update_like(0.0), {"X-Canopy-Num-Samples": ""}, 422, "bad_num_samples", None),
    ("zero samples", update_like(0.0), {"X-Canopy-Num-Samples": "0"}, 422, "bad_num_samples", None),
    ("bad metrics", update_like(0.0), {"X-Canopy-Metrics": "{oops"}, 422, "bad_metrics", None),
    ("nan metric", update_like(0.0), {"X-Canopy-Metrics": '{"l": NaN}'}, 422, "bad_metrics", None),
    (
        "no version",
        update_like(0.0),
        {"X-Canopy-Model-Version": ""},
        422,
        "bad_model_version",
        None,
    ),
]


def test_bad_uploads_are_refused_with_reasons(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    device, offer = offered_device(client, s3_store)

    for label, payload, headers, status, code, tensor in BAD_UPDATES:
        body = payload if isinstance(payload, bytes) else encode_tensors(payload)
        response = device.upload(offer, body=body, headers=headers)
        assert response.status_code == status, (label, response.text)
        assert response.json()["code"] == code, (label, response.json())
        assert response.json()["tensor"] == tensor, label
    accepted = device.upload(offer, update_like(0.25))
    metrics = client.get("/metrics").text

    assert accepted.status_code == 200 and accepted.json()["duplicate"] is False
    assert len(batches(s3_store, "leaf-0")) == 1  # nothing refused was stored
    assert 'canopy_gateway_results_rejected_total{reason="non_finite"} 2.0' in metrics
    assert 'canopy_gateway_results_rejected_total{reason="tensor_names"} 2.0' in metrics


def test_bodies_over_the_limit_are_413_even_when_streamed(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    device, offer = offered_device(client, s3_store)
    big = b"\x00" * (200 * 1024)
    chunks_sent = 0

    def chunked() -> Iterator[bytes]:
        nonlocal chunks_sent
        for start in range(0, len(big), 16 * 1024):
            chunks_sent += 1
            yield big[start : start + 16 * 1024]

    declared = device.upload(offer, body=big)
    streamed = client.post(
        str(offer["upload_url"]),
        content=chunked(),
        headers={
            **device.auth,
            "Content-Type": "application/octet-stream",
            "X-Canopy-Model-Version": str(offer["model_version"]),
            "X-Canopy-Num-Samples": "3",
        },
    )
    enrol_flood = client.post(
        "/v1/enrol",
        content=b"{" + b" " * 40_000 + b"}",
        headers={"Content-Type": "application/json"},
    )

    assert error(declared) == (413, "body_too_large")
    assert "transfer-encoding" not in {k.lower() for k in declared.request.headers}
    assert error(streamed) == (413, "body_too_large")
    assert error(enrol_flood) == (413, "body_too_large")
    assert client.get("/healthz").json()["status"] == "ok"


# --- late, duplicate, closed ----------------------------------------------------------


def test_duplicates_late_results_and_closed_rounds(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    first, second, third = devices_on("leaf-0", 3)
    devs = {d: Device(client, d) for d in (first, second, third)}
    for d in devs.values():
        d.enrol()
    open_test_round(s3_store, [first, second, third])
    offers = {d: devs[d].offer() for d in devs}

    accepted = devs[first].upload(offers[first])
    duplicate = devs[first].upload(offers[first])
    stale_version = devs[second].upload(
        offers[second], headers={"X-Canopy-Model-Version": "f" * 64}
    )
    set_round_status(s3_store, read_active(s3_store, JOB), "closed")
    closed = devs[third].upload(offers[third])
    closed_poll = devs[third].poll().json()
    set_round_status(s3_store, read_active(s3_store, JOB), "open")
    # Round 1 opens: results for round 0's task are late.
    open_test_round(s3_store, [third], rnd=1)
    old_task = devs[second].upload(offers[second])
    old_download = client.get(str(offers[second]["model"]["url"]), headers=devs[second].auth)  # type: ignore[index]
    metrics = client.get("/metrics").text

    assert accepted.json()["duplicate"] is False
    assert duplicate.status_code == 200 and duplicate.json()["duplicate"] is True
    assert duplicate.json()["received_at"] == accepted.json()["received_at"]
    assert error(stale_version) == (409, "late")
    assert stale_version.json()["details"]["reason"] == "model_version_not_current"
    assert error(closed) == (409, "late")
    assert closed_poll["status"] == "retry" and closed_poll["reason"] == "round_not_open"
    assert error(old_task) == (409, "late")
    assert error(old_download) == (409, "task_not_current")
    assert len(decode_update_batch(s3_store.get(batches(s3_store, "leaf-0")[0]).data, "b")) == 1
    assert len(batches(s3_store, "leaf-0")) == 1  # duplicates and late results are not stored
    assert f'canopy_gateway_late_results_total{{job="{JOB}"}} 3.0' in metrics
    assert "canopy_gateway_results_duplicate_total 1.0" in metrics


def test_results_after_the_deadline_are_late(s3_store: S3ObjectStore, client: httpx.Client) -> None:
    # The round stays open (the flow has not closed it yet) but its deadline passes
    # between the offer and the upload; the gateway goes by the task's own deadline.
    device = Device(client, devices_on("leaf-1", 1)[0])
    device.enrol()
    tasks = open_test_round(s3_store, [device.device_id], deadline_seconds=1.0)
    offer = device.offer()
    time.sleep(max(0.0, (tasks["leaf-1"].deadline - datetime.now(UTC)).total_seconds()) + 0.05)

    late = device.upload(offer)

    assert error(late) == (409, "late")
    assert late.json()["details"]["reason"] == "round_closed"
    assert read_active(s3_store, JOB).status == "open"


# --- group commit ------------------------------------------------------------------------


async def test_concurrent_uploads_share_batches(s3_store: S3ObjectStore) -> None:
    settings = gateway_settings(group_commit_max_wait_ms=300, group_commit_max_updates=8)
    ids = devices_on("leaf-0", 20)
    with GatewayThread(settings, s3_store, gateway_id="gw-batch") as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
            tokens = {d: await enrol_async(client, d) for d in ids}
            await asyncio.to_thread(open_test_round, s3_store, ids)

            async def play(i: int, d: str) -> httpx.Response:
                auth = {"Authorization": f"Bearer {tokens[d]}"}
                offer = (await client.get(f"/v1/jobs/{JOB}/devices/{d}/task", headers=auth)).json()[
                    "task"
                ]
                return await client.post(
                    offer["upload_url"],
                    content=encode_tensors(update_like(float(i))),
                    headers={
                        **auth,
                        "Content-Type": "application/octet-stream",
                        "X-Canopy-Model-Version": offer["model_version"],
                        "X-Canopy-Num-Samples": str(i + 1),
                    },
                )

            receipts = await asyncio.gather(*(play(i, d) for i, d in enumerate(ids)))

    keys = batches(s3_store, "leaf-0")
    stored = [u for key in keys for u in decode_update_batch(s3_store.get(key).data, key)]
    assert all(r.status_code == 200 for r in receipts)
    assert 3 <= len(keys) <= 8  # 20 updates, at most 8 per batch: far fewer PUTs than devices
    assert sorted(u.device_id for u in stored) == sorted(ids)
    assert {u.device_id: u.num_samples for u in stored} == {d: i + 1 for i, d in enumerate(ids)}


def test_an_upload_alone_at_the_gateway_is_acknowledged_without_the_linger(
    s3_store: S3ObjectStore,
) -> None:
    # Prepare: a gateway whose batches may linger ten minutes for company
    settings = gateway_settings(group_commit_max_wait_ms=600_000)
    with (
        GatewayThread(settings, s3_store, gateway_id="gw-alone") as gw,
        httpx.Client(base_url=gw.url, timeout=60) as client,
    ):
        device, offer = offered_device(client, s3_store)

        # Execute: the only upload of the round (nothing else arriving, nothing in commit)
        response = device.upload(offer)

    # Assert: acknowledged (stored and fenced) long before the linger could have ended
    assert response.status_code == 200 and response.json()["status"] == "accepted"
    [key] = batches(s3_store, "leaf-0")
    assert [u.device_id for u in decode_update_batch(s3_store.get(key).data, key)] == [
        device.device_id
    ]


# --- the rest of the surface ---------------------------------------------------------


def test_health_metrics_openapi_and_unknown_paths(client: httpx.Client) -> None:
    health = client.get("/healthz").json()
    spec = client.get("/openapi.json").json()
    metrics = client.get("/metrics")
    missing = client.get("/v1/nothing-here")
    wrong_method = client.delete("/v1/enrol")
    bad_job = client.get("/v1/jobs/..%2Fx/devices/d/task", headers={"Authorization": "Bearer x"})
    newline = client.get("/v1/jobs/job%0A/devices/d/task", headers={"Authorization": "Bearer x"})

    assert health == {"status": "ok", "gateway_id": "gw-test", "pending_updates": 0}
    assert set(spec["paths"]) >= {
        "/v1/enrol",
        "/v1/jobs/{job}/devices/{device_id}/task",
        "/v1/jobs/{job}/devices/{device_id}/tasks/{task_id}/model",
        "/v1/jobs/{job}/devices/{device_id}/tasks/{task_id}/result",
    }
    assert "EnrolRequest" in spec["components"]["schemas"]
    upload = spec["paths"]["/v1/jobs/{job}/devices/{device_id}/tasks/{task_id}/result"]["post"]
    assert "application/octet-stream" in upload["requestBody"]["content"]
    assert {p["name"] for p in upload["parameters"]} >= {
        "X-Canopy-Model-Version",
        "X-Canopy-Num-Samples",
    }
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "canopy_gateway_request_seconds_bucket" in metrics.text
    assert 'route="/healthz"' in metrics.text
    assert error(missing) == (404, "not_found")
    assert error(wrong_method) == (405, "method_not_allowed")
    assert error(bad_job) == (404, "not_found")  # %2F decodes to a path separator
    assert error(newline) == (422, "bad_request")


def test_hostile_requests_never_take_the_gateway_down(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    device, offer = offered_device(client, s3_store)
    rng = np.random.default_rng(7)
    header_sets = [
        {"X-Canopy-Num-Samples": "1" * 400},
        {"X-Canopy-Metrics": "[" * 3000 + "]" * 3000},
        {"X-Canopy-Metrics": json.dumps({"x" * 100: 1})},
        {"Content-Type": "application/octet-stream; charset=binary"},
        {"Range": "bytes=" + "9" * 200 + "-"},
    ]
    # A safetensors header claiming a huge tensor, and one with a lying length prefix.
    lying = (10**12).to_bytes(8, "little") + b"{}"
    huge_shape = encode_tensors({"w": np.zeros(1, np.float32)}).replace(b"[1]", b"[99999999]", 1)
    statuses = []

    for i in range(30):
        body = rng.bytes(int(rng.integers(0, 4000)))
        statuses.append(
            device.upload(offer, body=body, headers=header_sets[i % len(header_sets)]).status_code
        )
    statuses.append(device.upload(offer, body=lying).status_code)
    statuses.append(device.upload(offer, body=huge_shape).status_code)
    statuses.append(
        client.get(
            str(offer["model"]["url"]), headers={**device.auth, **header_sets[4]}
        ).status_code
    )  # type: ignore[index]

    assert all(400 <= s < 500 for s in statuses), statuses
    assert device.upload(offer, update_like(1.0)).status_code == 200
    assert client.get("/healthz").status_code == 200


async def test_memory_budget_turns_excess_uploads_away_with_503(s3_store: S3ObjectStore) -> None:
    # Prepare: 48 KiB updates, a 64 KiB budget for bodies held at once.
    big: TensorDict = {"w": np.zeros(12_000, np.float32)}
    first, second = devices_on("leaf-0", 2)
    await asyncio.to_thread(open_test_round, s3_store, [first, second], state=big)
    tuning = GatewayTuning(body_budget_bytes=64 * 1024)
    body = encode_tensors({"w": np.full(12_000, 0.5, np.float32)})

    with GatewayThread(gateway_settings(), s3_store, tuning=tuning) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:

            async def prepare(device: str) -> tuple[dict[str, str], dict[str, str]]:
                auth = {"Authorization": f"Bearer {await enrol_async(client, device)}"}
                offer = (
                    await client.get(f"/v1/jobs/{JOB}/devices/{device}/task", headers=auth)
                ).json()["task"]
                headers = {
                    **auth,
                    "Content-Type": "application/octet-stream",
                    "X-Canopy-Model-Version": offer["model_version"],
                    "X-Canopy-Num-Samples": "4",
                }
                return offer, headers

            (offer_a, head_a), (offer_b, head_b) = await prepare(first), await prepare(second)
            half_sent = asyncio.Event()

            async def slow_body():  # type: ignore[no-untyped-def]
                yield body[: len(body) // 2]
                half_sent.set()
                await asyncio.sleep(1.0)
                yield body[len(body) // 2 :]

            slow = asyncio.ensure_future(
                client.post(offer_a["upload_url"], content=slow_body(), headers=head_a)
            )
            await half_sent.wait()
            await asyncio.sleep(0.3)  # the first half is in the gateway's memory now
            refused = await client.post(offer_b["upload_url"], content=body, headers=head_b)
            accepted_slow = await slow
            retried = await client.post(offer_b["upload_url"], content=body, headers=head_b)

    assert error(refused) == (503, "overloaded")
    assert int(refused.headers["Retry-After"]) >= 1
    assert accepted_slow.status_code == 200 and retried.status_code == 200


# --- validation comes before the duplicate answer; the task caps the weight -----------------


def test_a_replay_is_validated_before_it_is_called_a_duplicate(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    device, offer = offered_device(client, s3_store)
    nan = {**update_like(0.0), "w": np.full((4, 3), np.nan, np.float32)}

    accepted = device.upload(offer, update_like(0.5))
    nan_replay = device.upload(offer, nan)
    garbage_replay = device.upload(offer, body=b"\x00garbage")
    no_samples_replay = device.upload(offer, headers={"X-Canopy-Num-Samples": "0"})
    set_round_status(s3_store, read_active(s3_store, JOB), "closed")
    honest_replay = device.upload(offer, update_like(0.5))
    nan_after_close = device.upload(offer, nan)

    assert accepted.status_code == 200 and accepted.json()["duplicate"] is False
    assert error(nan_replay) == (422, "non_finite")
    assert error(garbage_replay) == (422, "malformed_update")
    assert error(no_samples_replay) == (422, "bad_num_samples")
    assert honest_replay.status_code == 200 and honest_replay.json()["duplicate"] is True
    assert honest_replay.json()["received_at"] == accepted.json()["received_at"]
    assert error(nan_after_close) == (422, "non_finite")
    assert len(batches(s3_store, "leaf-0")) == 1


def test_a_task_caps_the_weight_a_device_may_claim(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    capped, free = devices_on("leaf-0", 1)[0], devices_on("leaf-1", 1)[0]
    devices = {d: Device(client, d) for d in (capped, free)}
    for d in devices.values():
        d.enrol()
    tasks = open_test_round(s3_store, [capped, free])
    key = read_active(s3_store, JOB).leaf_manifest_keys["leaf-0"]
    put_json(
        s3_store, key, tasks["leaf-0"].model_copy(update={"max_num_samples": 100}), kind="leaf-task"
    )
    offers = {d: devices[d].offer() for d in devices}

    over = devices[capped].upload(offers[capped], headers={"X-Canopy-Num-Samples": "101"})
    at_cap = devices[capped].upload(offers[capped], headers={"X-Canopy-Num-Samples": "100"})
    billion = devices[free].upload(offers[free], headers={"X-Canopy-Num-Samples": "1000000000"})
    over_hard_cap = devices[free].upload(
        offers[free], headers={"X-Canopy-Num-Samples": "1000000001"}
    )

    assert offers[capped]["max_num_samples"] == 100
    assert offers[free]["max_num_samples"] == 1_000_000_000  # no cap: the protocol's own
    assert error(over) == (422, "too_many_samples")
    assert over.json()["details"] == {"max_num_samples": 100, "num_samples": 101}
    assert at_cap.status_code == 200
    assert billion.status_code == 200  # the default keeps today's behaviour
    assert error(over_hard_cap) == (422, "bad_num_samples")
    [stored] = decode_update_batch(s3_store.get(batches(s3_store, "leaf-0")[0]).data, "b")
    assert stored.num_samples == 100


# --- the close fence: an acknowledgement is a promise the flow can rely on ------------------


class ClosingStore:
    """The test's S3 store; right after the first update batch lands, the round is closed.

    That is the race the fence exists for: the flow writes ``closed`` between a
    gateway's batch PUT and its acknowledgement.
    """

    def __init__(self, store: S3ObjectStore) -> None:
        self._store = store
        self.bucket = store.bucket
        self.closed = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> ObjectRef:
        ref = self._store.put_bytes(key, data, **kw)
        if "/updates/" in key and not self.closed:
            self.closed = True
            set_round_status(self._store, read_active(self._store, JOB), "closed")
        return ref


def test_a_round_closed_during_the_batch_write_acknowledges_nobody(
    s3_store: S3ObjectStore,
) -> None:
    ids = devices_on("leaf-0", 3)
    store = ClosingStore(s3_store)
    settings = gateway_settings(manifest_cache_seconds=30.0, group_commit_max_wait_ms=200)
    with (
        GatewayThread(settings, store, gateway_id="gw-fence") as gw,  # type: ignore[arg-type]
        httpx.Client(base_url=gw.url, timeout=10) as client,
    ):
        devices = [Device(client, d) for d in ids]
        for d in devices:
            d.enrol()
        open_test_round(s3_store, ids)
        offers = [d.offer() for d in devices]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda i: devices[i].upload(offers[i]), range(3)))
        # The gateway cached "open" for 30 s, but the fence read the truth: the door knows too.
        after = devices[0].upload(offers[0])
        metrics = client.get("/metrics").text

    # Every upload is refused: those in a batch written as the round closed by the fence,
    # any that reached the door after the fence's read refreshed the cache at the door.
    assert [error(a) for a in answers] == [(409, "late")] * 3
    reasons = {d: a.json()["details"]["reason"] for d, a in zip(ids, answers, strict=True)}
    assert set(reasons.values()) <= {"round_closed_during_write", "round_closed"}
    assert error(after) == (409, "late") and after.json()["details"]["reason"] == "round_closed"
    keys = batches(s3_store, "leaf-0")  # written, listed by the flow or not: never promised
    stored = [u.device_id for key in keys for u in decode_update_batch(s3_store.get(key).data, key)]
    assert stored and sorted(stored) == sorted(
        d for d, reason in reasons.items() if reason == "round_closed_during_write"
    )
    assert f"canopy_gateway_batch_fenced_total {float(len(keys))}" in metrics
    assert f'canopy_gateway_late_results_total{{job="{JOB}"}} 4.0' in metrics


async def test_close_then_list_finds_every_acknowledged_update(s3_store: S3ObjectStore) -> None:
    """The flow's side of the fence: write ``closed``, list at once, miss nothing acknowledged.

    Uploads straddle the close; the gateway caches manifests for a whole second
    and waits 100 ms to group commits, so without the fence some acknowledged
    updates would land after the list.
    """
    ids = devices_on("leaf-0", 24) + devices_on("leaf-1", 24)
    settings = gateway_settings(manifest_cache_seconds=1.0, group_commit_max_wait_ms=100)
    with GatewayThread(settings, s3_store, gateway_id="gw-race") as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
            tokens = {d: await enrol_async(client, d) for d in ids}
            await asyncio.to_thread(open_test_round, s3_store, ids)

            async def play(i: int, d: str) -> tuple[str, httpx.Response]:
                auth = {"Authorization": f"Bearer {tokens[d]}"}
                answer = await client.get(f"/v1/jobs/{JOB}/devices/{d}/task", headers=auth)
                offer = answer.json()["task"]
                await asyncio.sleep(0.015 * i)  # uploads spread over ~0.7 s
                response = await client.post(
                    offer["upload_url"],
                    content=encode_tensors(update_like(1.0)),
                    headers={
                        **auth,
                        "Content-Type": "application/octet-stream",
                        "X-Canopy-Model-Version": offer["model_version"],
                        "X-Canopy-Num-Samples": "5",
                    },
                )
                if response.status_code == 200 and len(acked_so_far) < 8:
                    acked_so_far.append(d)
                    if len(acked_so_far) == 8:
                        some_acked.set()
                return d, response

            def close_then_list() -> set[str]:
                set_round_status(s3_store, read_active(s3_store, JOB), "closed")
                keys = [k for leaf in LEAVES for k in batches(s3_store, leaf)]
                return {
                    u.device_id for k in keys for u in decode_update_batch(s3_store.get(k).data, k)
                }

            acked_so_far: list[str] = []
            some_acked = asyncio.Event()
            uploads = asyncio.gather(*(play(i, d) for i, d in enumerate(ids)))
            await asyncio.wait_for(some_acked.wait(), timeout=20)
            listed = await asyncio.to_thread(close_then_list)
            answers = dict(await uploads)

    acked = {d for d, r in answers.items() if r.status_code == 200}
    late = {d for d, r in answers.items() if r.status_code == 409}
    assert acked and late and acked | late == set(ids)
    assert acked <= listed  # 0 acknowledged updates missed, with no grace sleep
