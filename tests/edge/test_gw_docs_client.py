"""A device written from docs/protocol.md alone: raw httpx and safetensors, no Canopy client code.

Only the round's manifests are written with Canopy helpers, standing in for the
round flow; everything the device does follows the page.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import httpx
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from safetensors.numpy import load, save

from edge.protocol import ErrorCode
from edge.update_batch import decode_update_batch
from infra.keys import updates_prefix
from infra.settings import GatewaySettings
from infra.store import S3ObjectStore
from tests.support.harness import GatewayThread, write_round

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_a_device_written_from_the_protocol_page(s3_store: S3ObjectStore) -> None:
    me, secret = "phone-7f3a9c", "canopy-local-enrolment"
    write_round(
        s3_store,
        job="hello-mobile",
        run_id="run-1",
        rnd=0,
        leaves=["leaf-0", "leaf-1"],
        selected=[me],
        state={"vector": np.zeros(16, np.float32)},
        runtime="executorch",
    )
    with (
        GatewayThread(GatewaySettings(), s3_store) as gw,
        httpx.Client(base_url=gw.url, timeout=10) as http,
    ):
        # 1. Enrol: a key of the device's own, a challenge, its signature, the enrolment.
        own_key = Ed25519PrivateKey.generate()
        public_key = b64(own_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
        asked = http.post("/v1/enrol/challenge", json={"device_id": me})
        challenge = asked.json()["challenge"]
        signature = b64(own_key.sign(f"canopy-enrol-v1\n{me}\n{challenge}".encode()))
        enrolled = http.post(
            "/v1/enrol",
            json={
                "device_id": me,
                "enrolment_secret": secret,
                "jobs": ["hello-mobile"],
                "runtimes": ["executorch"],
                "platform": "android-14",
                "public_key": public_key,
                "challenge": challenge,
                "signature": signature,
            },
        )
        auth = {"Authorization": f"Bearer {enrolled.json()['token']}"}
        # 2. Ask for work.
        answer = http.get(f"/v1/jobs/hello-mobile/devices/{me}/task", headers=auth).json()
        task = answer["task"]
        # 3. Download (no .pte for hello-mobile: model is the weights), resume with Range.
        head = http.get(task["model"]["url"], headers={**auth, "Range": "bytes=0-9"})
        rest = http.get(task["model"]["url"], headers={**auth, "Range": "bytes=10-"})
        blob = head.content + rest.content
        # 4. Train, compute new - old, upload as safetensors with the headers.
        old = load(blob)
        new = {name: value + 0.5 for name, value in old.items()}
        update = {name: (new[name] - old[name]).astype(old[name].dtype) for name in old}
        receipt = http.post(
            task["upload_url"],
            content=save(update),
            headers={
                **auth,
                "Content-Type": "application/octet-stream",
                "X-Canopy-Model-Version": task["model_version"],
                "X-Canopy-Num-Samples": "128",
                "X-Canopy-Metrics": json.dumps({"loss": 0.3}),
            },
        )
        after = http.get(f"/v1/jobs/hello-mobile/devices/{me}/task", headers=auth).json()

    assert asked.status_code == 200 and asked.json()["device_id"] == me
    assert enrolled.status_code == 200 and enrolled.json()["token_type"] == "Bearer"
    assert answer["status"] == "task" and task["runtime"] == "executorch"
    assert task["model"]["format"] == "safetensors" and task["model"] == task["weights"]
    assert head.status_code == 206 and rest.status_code == 206
    assert hashlib.sha256(blob).hexdigest() == head.headers["X-Canopy-Sha256"]
    assert task["model_version"] == task["weights"]["sha256"]
    assert set(task["tensor_spec"]) == set(old)
    assert receipt.status_code == 200
    assert receipt.json()["status"] == "accepted" and receipt.json()["duplicate"] is False
    assert after["status"] == "retry" and after["reason"] == "already_submitted"
    assert int(after["retry_after_seconds"]) >= 0
    [key] = s3_store.list_keys(updates_prefix("hello-mobile", "run-1", 0, task["leaf"]))
    [stored] = decode_update_batch(s3_store.get(key).data, source=key)
    assert stored.device_id == me and stored.num_samples == 128
    np.testing.assert_array_equal(stored.tensors["vector"], np.full(16, 0.5, np.float32))


def test_every_error_code_and_endpoint_is_documented() -> None:
    page = DOC.read_text()

    missing = [code.value for code in ErrorCode if f"`{code.value}`" not in page]
    assert missing == []
    for path in (
        "/v1/enrol",
        "/v1/enrol/challenge",
        "/v1/jobs/{job}/devices/{device_id}/task",
        "/openapi.json",
    ):
        assert path in page
    for header in ("X-Canopy-Sha256", "X-Canopy-Model-Version", "X-Canopy-Num-Samples"):
        assert header in page
    assert "```mermaid" in page and "sequenceDiagram" in page
