"""The fault proxy itself: it relays S3 faithfully, injects what it is told, and counts it.

These run Canopy's real S3 client (``infra.store.S3ObjectStore``, boto3) against
the real moto server through the proxy, so they also pin down which faults
boto3's retries absorb as ``infra/store.py`` configures them (standard mode, 5
attempts) and which reach the caller. They take seconds and are not ``slow``.
"""

from __future__ import annotations

import hashlib
import socket

import pytest

from infra.errors import StoreError
from infra.settings import S3Settings
from infra.store import S3ObjectStore
from tests.support.faulty_s3 import FAULT_KINDS, FaultPlan, FaultyProxy


def store_via(proxy: FaultyProxy, s3_settings: S3Settings) -> S3ObjectStore:
    return S3ObjectStore(s3_settings.model_copy(update={"endpoint_url": proxy.url}))


def test_relays_bodies_headers_and_metadata_byte_for_byte(
    s3_settings: S3Settings, s3_store: S3ObjectStore
) -> None:
    with FaultyProxy(s3_settings.endpoint_url or "") as proxy:
        store = store_via(proxy, s3_settings)
        blobs = {
            f"k/{n}": bytes(range(256)) * (n // 256) + b"x" * (n % 256)
            for n in (0, 1, 70_000, 3 * 1024 * 1024 + 7)
        }
        for key, data in blobs.items():
            ref = store.put_bytes(key, data, kind="blob", metadata={"who": "proxy-test"})
            assert ref.sha256 == hashlib.sha256(data).hexdigest()
        for key, data in blobs.items():
            got = s3_store.get(key)  # read directly from moto: what was stored
            assert got.data == data and got.metadata["who"] == "proxy-test"
            via = store.get(key)  # and back through the proxy
            assert via.data == data and via.ref == got.ref
        assert store.list_keys("k/") == sorted(blobs)
        assert store.head("k/1") is not None and store.head("k/absent") is None
        stats = proxy.stats()
    assert stats.injected_total == 0 and stats.upstream_errors == 0
    assert stats.requests["PUT"] >= 4 and stats.requests["GET"] >= 4
    assert stats.requests["LIST"] >= 1 and stats.requests["HEAD"] >= 2


@pytest.mark.parametrize("kind", [k for k in FAULT_KINDS if k != "truncate"])
def test_boto3_retries_absorb_each_fault_kind(
    kind: str, s3_settings: S3Settings, s3_store: S3ObjectStore
) -> None:
    plan = FaultPlan(rate=0.25, kinds={kind: 1.0}, delay_s=0.05, seed=7)  # type: ignore[dict-item]
    with FaultyProxy(s3_settings.endpoint_url or "", plan) as proxy:
        store = store_via(proxy, s3_settings)
        for i in range(8):
            store.put_bytes(f"f/{i}", b"%d" % i * 1000, kind="blob")
            assert store.get(f"f/{i}").data == b"%d" % i * 1000
            assert store.head(f"f/{i}") is not None
        assert len(store.list_keys("f/")) == 8
        stats = proxy.stats()
    assert stats.by_kind()[kind] > 0 and set(stats.by_kind()) == {kind}
    for i in range(8):  # nothing half-written, nothing written twice under another key
        assert s3_store.get(f"f/{i}").data == b"%d" % i * 1000
    assert len(s3_store.list_keys("f/")) == 8


def test_faults_follow_operation_path_and_limit(
    s3_settings: S3Settings, s3_store: S3ObjectStore
) -> None:
    s3_store.put_bytes("a/updates/x", b"1", kind="blob")
    s3_store.put_bytes("a/tasks/y", b"2", kind="blob")
    plan = FaultPlan(
        rate=1.0, kinds={"error500": 1.0}, ops=frozenset({"GET"}), path="/updates/", limit=3
    )
    with FaultyProxy(s3_settings.endpoint_url or "", plan) as proxy:
        store = store_via(proxy, s3_settings)
        assert store.get("a/tasks/y").data == b"2"  # another path: untouched
        assert store.head("a/updates/x") is not None  # another operation: untouched
        assert store.get("a/updates/x").data == b"1"  # three 500s, then the fourth try
        assert store.get("a/updates/x").data == b"1"  # the limit is spent
        stats = proxy.stats()
    assert stats.injected == {("GET", "error500"): 3}


def test_a_six_request_outage_exhausts_boto3_retries(
    s3_settings: S3Settings, s3_store: S3ObjectStore
) -> None:
    """Six attempts in all: ``max_attempts: 5`` in infra/store.py counts the retries."""
    s3_store.put_bytes("b/k", b"v", kind="blob")
    plan = FaultPlan(rate=1.0, kinds={"error500": 1.0}, ops=frozenset({"GET"}), limit=6)
    with FaultyProxy(s3_settings.endpoint_url or "", plan) as proxy:
        store = store_via(proxy, s3_settings)
        with pytest.raises(StoreError, match="InternalError"):
            store.get("b/k")
        assert store.get("b/k").data == b"v"
        assert proxy.stats().injected_total == 6


def test_a_dead_upstream_looks_like_a_dead_service() -> None:
    """A tap whose gateway is gone resets connections, so clients fail over."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    with FaultyProxy(f"http://127.0.0.1:{port}") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = conn.recv(100)
            except ConnectionResetError:
                answer = b""
        assert answer == b""
        assert proxy.stats().upstream_errors == 1


def test_refuses_non_loopback_upstreams_and_bad_plans() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        FaultyProxy("http://example.com:80")
    with pytest.raises(ValueError, match="rate"):
        FaultPlan(rate=1.5)
    with pytest.raises(ValueError, match="ops"):
        FaultPlan(rate=0.1, ops=frozenset({"PATCH"}))
