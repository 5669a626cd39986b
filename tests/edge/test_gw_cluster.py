"""Several gateways, crashes and TLS: what statelessness has to guarantee."""

from __future__ import annotations

import datetime as dt
import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aggregation.tensors import TensorDict, encode_tensors
from edge.routing import leaf_for_device
from edge.update_batch import decode_update_batch
from infra.keys import updates_prefix
from infra.settings import GatewaySettings, S3Settings
from infra.store import S3ObjectStore
from tests.edge.devices import Device
from tests.support.harness import GatewayProcess, GatewayThread, write_round

JOB, RUN = "cluster-test", "run-1"
LEAVES = ["leaf-0", "leaf-1", "leaf-2"]
SECRET = "canopy-local-enrolment"
STATE: TensorDict = {"w": np.zeros((8,), np.float32)}


def enrol(client: httpx.Client, device_id: str) -> dict[str, str]:
    device = Device(client, device_id)
    response = device.enrol(JOB, secret=SECRET)
    response.raise_for_status()
    return device.auth


def update_body(value: float) -> bytes:
    return encode_tensors({"w": np.full(8, value, np.float32)})


def upload(
    client: httpx.Client,
    auth: dict[str, str],
    device_id: str,
    value: float,
    body: Iterator[bytes] | None = None,
) -> httpx.Response:
    offer = client.get(f"/v1/jobs/{JOB}/devices/{device_id}/task", headers=auth).json()["task"]
    return client.post(
        offer["upload_url"],
        content=body if body is not None else update_body(value),
        headers={
            **auth,
            "Content-Type": "application/octet-stream",
            "X-Canopy-Model-Version": offer["model_version"],
            "X-Canopy-Num-Samples": "5",
        },
    )


def wait_until_pending(client: httpx.Client, count: int, timeout: float = 20.0) -> None:
    """Until the gateway holds ``count`` accepted updates that wait for their batch."""
    deadline = time.monotonic() + timeout
    while client.get("/healthz").json()["pending_updates"] != count:
        assert time.monotonic() < deadline, f"never {count} pending update(s)"
        time.sleep(0.02)


def stored_devices(store: S3ObjectStore) -> list[str]:
    out = []
    for leaf in LEAVES:
        for key in store.list_keys(updates_prefix(JOB, RUN, 0, leaf)):
            out += [u.device_id for u in decode_update_batch(store.get(key).data, key)]
    return sorted(out)


def test_a_killed_gateway_loses_nothing_it_acknowledged(
    s3_settings: S3Settings, s3_store: S3ObjectStore
) -> None:
    # Prepare: batches close at 2 updates or after 3 s, so an upload is still waiting
    # for its batch when the gateway is killed while another one is arriving (its
    # body still on the way: the batch lingers for it).
    settings = GatewaySettings(
        group_commit_max_updates=2, group_commit_max_wait_ms=3000, manifest_cache_seconds=0.0
    )
    ids = [f"dev-{i}" for i in range(5)]
    write_round(s3_store, job=JOB, run_id=RUN, rnd=0, leaves=["leaf-0"], selected=ids, state=STATE)
    first = GatewayProcess(s3_settings, settings, gateway_id="gw-first").start()
    quick = settings.model_copy(update={"group_commit_max_wait_ms": 20})
    second = GatewayProcess(s3_settings, quick, gateway_id="gw-second").start()
    try:
        with (
            httpx.Client(base_url=first.url, timeout=30) as a,
            httpx.Client(base_url=second.url, timeout=30) as b,
        ):
            auth = {d: enrol(a, d) for d in ids}
            acked: list[str] = []
            lock = threading.Lock()

            def send(device_id: str, value: float, body: Iterator[bytes] | None = None) -> None:
                try:
                    if upload(a, auth[device_id], device_id, value, body).status_code == 200:
                        with lock:
                            acked.append(device_id)
                except httpx.HTTPError:
                    pass  # the gateway died before answering: not acknowledged

            # Execute: two uploads are acknowledged; a third waits in its open batch for a
            # fourth whose body is still arriving when the gateway gets SIGKILL.
            pair = [threading.Thread(target=send, args=(d, 1.0)) for d in ids[:2]]
            for t in pair:
                t.start()
            for t in pair:
                t.join()
            killed = threading.Event()

            def dripping() -> Iterator[bytes]:
                data = update_body(3.0)
                yield data[:16]
                killed.wait(30)  # the rest never arrives: the gateway dies first
                yield data[16:]

            slow = threading.Thread(target=send, args=(ids[3], 3.0, dripping()))
            slow.start()
            time.sleep(0.5)  # its headers are admitted, its body is on the way
            lone = threading.Thread(target=send, args=(ids[2], 2.0))
            lone.start()
            wait_until_pending(a, 1)  # in the open batch, lingering for the slow upload
            time.sleep(0.3)
            first.kill()
            killed.set()
            lone.join()
            slow.join()
            after_crash = stored_devices(s3_store)
            # The device that got no answer retries at the second gateway, with the
            # token the first one issued; so does one that was already acknowledged.
            retried = upload(b, auth[ids[2]], ids[2], 2.0)
            repeated = upload(b, auth[ids[0]], ids[0], 1.0)
            rest = [upload(b, auth[d], d, 3.0) for d in ids[3:]]
    finally:
        first.kill()
        second.stop()

    # Assert
    assert sorted(acked) == ids[:2]
    assert after_crash == ids[:2]  # every acknowledged update, and nothing else
    assert retried.status_code == 200 and all(r.status_code == 200 for r in rest)
    assert repeated.status_code == 200  # another gateway cannot know; the flow de-duplicates
    final = stored_devices(s3_store)
    assert sorted(set(final)) == ids
    assert final.count(ids[0]) == 2


def test_two_gateways_serve_one_leaf_identically(s3_store: S3ObjectStore) -> None:
    settings = GatewaySettings(manifest_cache_seconds=0.2, group_commit_max_wait_ms=10)
    ids = [f"sim-3-{i:05d}" for i in range(30)]
    selected = ids[::2]
    tasks = write_round(
        s3_store, job=JOB, run_id=RUN, rnd=0, leaves=LEAVES, selected=selected, state=STATE
    )
    with (
        GatewayThread(settings, s3_store, gateway_id="gw-a") as gw_a,
        GatewayThread(settings, s3_store, gateway_id="gw-b") as gw_b,
        httpx.Client(base_url=gw_a.url, timeout=10) as a,
        httpx.Client(base_url=gw_b.url, timeout=10) as b,
    ):
        auth = {d: enrol(a if i % 2 else b, d) for i, d in enumerate(ids)}
        answers_a = {
            d: a.get(f"/v1/jobs/{JOB}/devices/{d}/task", headers=auth[d]).json() for d in ids
        }
        answers_b = {
            d: b.get(f"/v1/jobs/{JOB}/devices/{d}/task", headers=auth[d]).json() for d in ids
        }
        receipts = [
            upload(a if i % 2 else b, auth[d], d, float(i)).status_code
            for i, d in enumerate(selected)
        ]

    for d in ids:
        offered_a, offered_b = answers_a[d], answers_b[d]
        if d in selected:
            leaf = leaf_for_device(d, LEAVES)
            assert offered_a["task"]["leaf"] == offered_b["task"]["leaf"] == leaf
            assert (
                offered_a["task"]["task_id"] == offered_b["task"]["task_id"] == tasks[leaf].task_id
            )
            assert offered_a["task"]["model_version"] == offered_b["task"]["model_version"]
        else:
            assert offered_a["status"] == offered_b["status"] == "retry"
            assert offered_a["reason"] == offered_b["reason"] == "not_selected"
    assert receipts == [200] * len(selected)
    assert stored_devices(s3_store) == sorted(selected)
    gateways_used = {
        key.rsplit("/", 1)[1].split("-")[1]
        for leaf in LEAVES
        for key in s3_store.list_keys(updates_prefix(JOB, RUN, 0, leaf))
    }
    assert gateways_used == {"a", "b"}


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "gw.crt", tmp_path / "gw.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_gateway_serves_https(s3_store: S3ObjectStore, self_signed: tuple[str, str]) -> None:
    cert, key = self_signed
    write_round(
        s3_store, job=JOB, run_id=RUN, rnd=0, leaves=LEAVES, selected=["phone-1"], state=STATE
    )
    with GatewayThread(GatewaySettings(), s3_store, certfile=cert, keyfile=key) as gw:
        assert gw.url.startswith("https://")
        with httpx.Client(base_url=gw.url, verify=cert, timeout=10) as client:
            auth = enrol(client, "phone-1")
            accepted = upload(client, auth, "phone-1", 0.5)
        with (
            pytest.raises(httpx.ConnectError),
            httpx.Client(base_url=gw.url, timeout=5) as untrusting,
        ):
            untrusting.get("/healthz")  # the system trust store does not know our certificate

    assert accepted.status_code == 200
    assert stored_devices(s3_store) == ["phone-1"]
