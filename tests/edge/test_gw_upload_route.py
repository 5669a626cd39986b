"""The raw ASGI upload route (edge.gateway.upload_route) answers exactly as the FastAPI route.

Uploads are served by ``UploadRoute`` before FastAPI sees them; the FastAPI
route stays for the OpenAPI document and for apps mounted under a root path
(where ``UploadRoute`` steps aside). Both run ``UploadHandler``. These tests
send the same requests both ways, in process over ASGI, and compare status,
error code, headers and the metrics label.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from aggregation.tensors import encode_tensors
from edge.gateway.app import create_app
from edge.gateway.tokens import issue_token
from edge.gateway.upload_route import match_upload_path
from edge.update_batch import decode_update_batch
from infra.store import MemoryObjectStore
from tests.edge.devices import JOB, LEAVES, RUN, STATE, gateway_settings
from tests.support.harness import write_round

ROOT = "/gw"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/jobs/j/devices/d/tasks/t/result", ("j", "d", "t")),
        ("/v1/jobs/j/devices/d/tasks/t/result/", None),  # trailing slash: the router's business
        ("/v1/jobs/j/devices//tasks/t/result", None),  # empty parameter
        ("/v1/jobs/j/devices/d/tasks/t/model", None),
        ("/v2/jobs/j/devices/d/tasks/t/result", None),
        ("/v1/jobs/j/devices/a/b/tasks/t/result", None),  # an id with a (decoded) slash
        ("v1/jobs/j/devices/d/tasks/t/result", None),
        ("/v1/jobs/j/devices/d/task", None),
    ],
)
def test_the_upload_path_matches_as_the_router_would(
    path: str, expected: tuple[str, ...] | None
) -> None:
    assert match_upload_path(path) == expected


def _upload(device: str, task: dict[str, object], token: str, **headers: str) -> dict[str, str]:
    sent = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/octet-stream",
        "X-Canopy-Model-Version": str(task["model_version"]),
        "X-Canopy-Num-Samples": "12",
    }
    sent.update(headers)
    return sent


async def test_raw_and_fastapi_upload_routes_answer_alike() -> None:
    # Prepare: one gateway app in process; two devices per case, one for each route
    store = MemoryObjectStore()
    devices = [f"dev-{i:02d}" for i in range(16)]
    write_round(store, job=JOB, run_id=RUN, rnd=0, leaves=LEAVES, selected=devices, state=STATE)
    settings = gateway_settings()
    app = create_app(settings, store, gateway_id="gw-route")
    secret = settings.token_secret.get_secret_value().encode()
    tokens = {
        d: issue_token(secret, d, ["pytorch"], now=int(time.time()), ttl=600)[0] for d in devices
    }
    good = encode_tensors({k: np.full_like(v, 0.5) for k, v in STATE.items()})
    nan = encode_tensors({k: np.full_like(v, np.nan) for k, v in STATE.items()})
    raw = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
    mounted = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, root_path=ROOT), base_url="http://gw"
    )

    async def offer(client: httpx.AsyncClient, prefix: str, d: str) -> dict[str, object]:
        answer = await client.get(
            f"{prefix}/v1/jobs/{JOB}/devices/{d}/task",
            headers={"Authorization": f"Bearer {tokens[d]}"},
        )
        return dict(answer.json()["task"])

    cases = {
        "accepted": lambda d, t: (good, _upload(d, t, tokens[d])),
        "non_finite": lambda d, t: (nan, _upload(d, t, tokens[d])),
        "no_token": lambda d, t: (good, {"X-Canopy-Num-Samples": "12"}),
        "bad_version": lambda d, t: (
            good,
            _upload(d, t, tokens[d], **{"X-Canopy-Model-Version": "x"}),
        ),
        "bad_samples": lambda d, t: (
            good,
            _upload(d, t, tokens[d], **{"X-Canopy-Num-Samples": "-1"}),
        ),
        "wrong_type": lambda d, t: (
            good,
            _upload(d, t, tokens[d], **{"Content-Type": "text/plain"}),
        ),
        "other_token": lambda d, t: (good, _upload(d, t, tokens[devices[0]])),
    }
    answers: dict[str, list[tuple[int, str | None, bool, str]]] = {}
    # Execute: each case once through the raw route, once through FastAPI's
    async with raw, mounted:
        for i, (name, build) in enumerate(cases.items()):
            for client, prefix, d in (
                (raw, "", devices[2 * i + 2]),
                (mounted, ROOT, devices[2 * i + 3]),
            ):
                task = await offer(client, prefix, d)
                body, headers = build(d, task)
                answer = await client.post(
                    f"{prefix}{task['upload_url']}", content=body, headers=headers
                )
                payload = answer.json()
                answers.setdefault(name, []).append(
                    (
                        answer.status_code,
                        payload.get("code"),
                        answer.headers.get("x-canopy-gateway") == "gw-route",
                        answer.headers["content-type"],
                    )
                )
            if name == "accepted":
                assert payload["duplicate"] is False and payload["device_id"] == d
        bad_path = await raw.post(
            f"/v1/jobs/{JOB}/devices/{'x' * 300}/tasks/t/result", content=good
        )

    # Assert: the same status, code, gateway header and content type either way
    for name, (fast, framework) in answers.items():
        assert fast == framework, name
    assert answers["accepted"][0][:3] == (200, None, True)
    assert [answers[n][0][:2] for n in ("non_finite", "no_token", "other_token")] == [
        (422, "non_finite"),
        (401, "missing_token"),
        (403, "device_mismatch"),
    ]
    assert (bad_path.status_code, bad_path.json()["code"]) == (422, "bad_request")
    metrics = app.state.metrics.registry.get_sample_value
    route = "/v1/jobs/{job}/devices/{device_id}/tasks/{task_id}/result"
    timed = metrics("canopy_gateway_request_seconds_count", {"route": route, "method": "POST"})
    assert timed == 2 * len(cases) + 1  # every upload, either route, timed under its template
    assert metrics("canopy_gateway_results_accepted_total", {"job": JOB}) == 2
    stored = [
        u.device_id
        for key in store.list_keys(f"{JOB}/{RUN}/round-00000/updates/")
        for u in decode_update_batch(store.get(key).data, key)
    ]
    assert sorted(stored) == [devices[2], devices[3]]  # acknowledged means in S3, both ways
