"""A minimal device and helpers for driving a real gateway over HTTP in tests.

``Device`` speaks the protocol of docs/protocol.md with httpx, one call per
method, and returns raw responses so that tests can assert on every status and
code. The round itself is written with ``tests.support.harness.write_round``;
``open_test_round`` writes one of the test job, ``offered_device`` one for a
single enrolled device and hands back its offer.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np

from aggregation.tensors import TensorDict, encode_tensors
from edge.manifests import LeafTask
from edge.routing import leaf_for_device
from edge.simulator.identity import DeviceKey
from infra.keys import updates_prefix
from infra.settings import GatewaySettings
from infra.store import S3ObjectStore
from tests.support.harness import write_round

JOB, RUN = "hello-test", "run-1"
LEAVES = ["leaf-0", "leaf-1"]
SECRET = "canopy-local-enrolment"
STATE: TensorDict = {
    "w": np.zeros((4, 3), np.float32),
    "b": np.zeros(3, np.float32),
}


def gateway_settings(**overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "max_body_bytes": 64 * 1024,
        "group_commit_max_wait_ms": 20,
        "manifest_cache_seconds": 0.0,  # tests flip round status and expect it at once
    }
    values.update(overrides)
    return GatewaySettings(**values)  # type: ignore[arg-type]


def enrol_body(
    device_id: str,
    key: DeviceKey,
    challenge: str,
    *,
    jobs: list[str],
    runtimes: list[str],
    secret: str = SECRET,
) -> dict[str, object]:
    """The JSON of ``POST /v1/enrol``, signed with ``key``."""
    return {
        "device_id": device_id,
        "enrolment_secret": secret,
        "jobs": jobs,
        "runtimes": runtimes,
        "public_key": key.public_key,
        "challenge": challenge,
        "signature": key.sign(device_id, challenge),
    }


def key_for(device_id: str) -> DeviceKey:
    """The key a test device with this id holds (the same in every test and gateway)."""
    return DeviceKey.derive(f"tests:{device_id}")


class Device:
    """A minimal device speaking the protocol, for driving the gateway in tests."""

    def __init__(
        self,
        client: httpx.Client,
        device_id: str,
        runtimes: tuple[str, ...] = ("pytorch",),
        key: DeviceKey | None = None,
    ):
        self.client = client
        self.device_id = device_id
        self.runtimes = runtimes
        self.key = key or key_for(device_id)
        self.token = ""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def challenge(self) -> httpx.Response:
        return self.client.post("/v1/enrol/challenge", json={"device_id": self.device_id})

    def enrol(self, job: str = JOB, *, secret: str = SECRET) -> httpx.Response:
        """Ask for a challenge, sign it, enrol; the first failing answer, or the enrolment."""
        asked = self.challenge()
        if asked.status_code != 200:
            return asked
        body = enrol_body(
            self.device_id,
            self.key,
            asked.json()["challenge"],
            jobs=[job],
            runtimes=list(self.runtimes),
            secret=secret,
        )
        response = self.client.post("/v1/enrol", json=body)
        if response.status_code == 200:
            self.token = response.json()["token"]
        return response

    def poll(self, job: str = JOB) -> httpx.Response:
        return self.client.get(f"/v1/jobs/{job}/devices/{self.device_id}/task", headers=self.auth)

    def offer(self) -> dict[str, object]:
        answer = self.poll().json()
        assert answer["status"] == "task", answer
        task: dict[str, object] = answer["task"]
        return task

    def upload(
        self,
        offer: dict[str, object],
        tensors: TensorDict | None = None,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        payload = body if body is not None else encode_tensors(tensors or update_like(0.1))
        sent = {
            **self.auth,
            "Content-Type": "application/octet-stream",
            "X-Canopy-Model-Version": str(offer["model_version"]),
            "X-Canopy-Num-Samples": "12",
            "X-Canopy-Metrics": json.dumps({"loss": 0.5}),
        }
        sent.update(headers or {})
        return self.client.post(str(offer["upload_url"]), content=payload, headers=sent)


def upload_headers(device: Device, offer: dict[str, object], **extra: str) -> dict[str, str]:
    """The headers of ``device``'s upload for ``offer`` (12 samples), ``extra`` over them."""
    return {
        **device.auth,
        "Content-Type": "application/octet-stream",
        "X-Canopy-Model-Version": str(offer["model_version"]),
        "X-Canopy-Num-Samples": "12",
        **extra,
    }


def update_like(value: float) -> TensorDict:
    return {name: np.full(arr.shape, value, arr.dtype) for name, arr in STATE.items()}


def devices_on(leaf: str, count: int, prefix: str = "dev") -> list[str]:
    found: list[str] = []
    i = 0
    while len(found) < count:
        if leaf_for_device(f"{prefix}-{i}", LEAVES) == leaf:
            found.append(f"{prefix}-{i}")
        i += 1
    return found


def error(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert body["message"], body
    return response.status_code, body["code"]


def batches(store: S3ObjectStore, leaf: str, rnd: int = 0) -> list[str]:
    return store.list_keys(updates_prefix(JOB, RUN, rnd, leaf))


async def enrol_async(client: httpx.AsyncClient, device_id: str, job: str = JOB) -> str:
    """Enrol ``device_id`` (its test key) for ``job`` with runtime pytorch; its token."""
    asked = await client.post("/v1/enrol/challenge", json={"device_id": device_id})
    assert asked.status_code == 200, asked.text
    body = enrol_body(
        device_id,
        key_for(device_id),
        asked.json()["challenge"],
        jobs=[job],
        runtimes=["pytorch"],
    )
    response = await client.post("/v1/enrol", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


def open_test_round(
    store: S3ObjectStore,
    selected: list[str],
    *,
    rnd: int = 0,
    state: TensorDict = STATE,
    **options: Any,
) -> dict[str, LeafTask]:
    """Open round ``rnd`` of the test job (``JOB``/``RUN`` over ``LEAVES``, model ``STATE``)
    for the ``selected`` devices; ``options`` are ``write_round``'s."""
    return write_round(
        store,
        job=JOB,
        run_id=RUN,
        rnd=rnd,
        leaves=LEAVES,
        selected=selected,
        state=state,
        **options,
    )


def offered_device(
    client: httpx.Client, store: S3ObjectStore, *, leaf: str = "leaf-0", **options: Any
) -> tuple[Device, dict[str, object]]:
    """One device of ``leaf``, enrolled and selected in round 0 of the test job, and its offer;
    ``options`` are ``write_round``'s (``kind="evaluate"`` offers an evaluation)."""
    device = Device(client, devices_on(leaf, 1)[0])
    device.enrol()
    open_test_round(store, [device.device_id], **options)
    return device, device.offer()
