"""Pure parts of the edge contract: routing, tokens, manifests, batch codec, header parsers."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation.tensors import TensorSpec, encode_tensors
from edge.gateway.cache import BytesCache, FreshReads, TtlCache
from edge.gateway.tokens import issue_token, verify_token
from edge.manifests import (
    ActiveRound,
    DataHint,
    LeafTask,
    device_key,
    identity_key,
    make_task_id,
    registry_prefix,
)
from edge.protocol import ErrorCode, ProtocolError, parse_metrics, parse_num_samples, parse_range
from edge.routing import assign_leaves, leaf_for_device
from edge.update_batch import BatchContext, DeviceUpdate, decode_update_batch, encode_update_batch
from infra.errors import ValidationError
from infra.store import ObjectRef

SECRET = b"test-secret"
REF = ObjectRef(bucket="b", key="j/r/round-00000/global.safetensors", sha256="a" * 64, size=10)


# --- routing ---------------------------------------------------------------------------


def test_routing_is_stable_and_order_free() -> None:
    leaves = [f"leaf-{i}" for i in range(8)]
    devices = [f"sim-0-{i:05d}" for i in range(500)]

    first = {d: leaf_for_device(d, leaves) for d in devices}
    shuffled = {d: leaf_for_device(d, list(reversed(leaves))) for d in devices}

    assert first == shuffled
    # Pinned values: any change to the hash breaks every running fleet's placement.
    assert leaf_for_device("sim-0-00000", leaves) == first["sim-0-00000"]
    assert [leaf_for_device(f"dev-{i}", ["leaf-0", "leaf-1"]) for i in range(6)] == [
        leaf_for_device(f"dev-{i}", ("leaf-1", "leaf-0")) for i in range(6)
    ]


def test_routing_spreads_devices_and_moves_few_when_a_leaf_is_added() -> None:
    leaves = [f"leaf-{i}" for i in range(4)]
    devices = [f"d{i}" for i in range(4000)]

    counts = Counter(leaf_for_device(d, leaves) for d in devices)
    before = {d: leaf_for_device(d, leaves) for d in devices}
    after = {d: leaf_for_device(d, [*leaves, "leaf-4"]) for d in devices}
    moved = [d for d in devices if before[d] != after[d]]

    assert all(800 < n < 1200 for n in counts.values()), counts
    assert all(after[d] == "leaf-4" for d in moved)  # only devices the new leaf wins move
    assert 600 < len(moved) < 1000  # about 1/5


def test_assign_leaves_keeps_every_leaf_and_refuses_none() -> None:
    groups = assign_leaves(["a", "b", "c"], ["leaf-0", "leaf-1", "leaf-2"])

    assert set(groups) == {"leaf-0", "leaf-1", "leaf-2"}
    assert sorted(d for group in groups.values() for d in group) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="at least one leaf"):
        leaf_for_device("a", [])


# --- tokens ----------------------------------------------------------------------------


def test_token_round_trip_and_expiry() -> None:
    token, expires = issue_token(SECRET, "dev-1", ("pytorch",), now=1000, ttl=60)

    claims = verify_token(SECRET, token, now=1059)

    assert (claims.device_id, claims.runtimes, expires) == ("dev-1", ("pytorch",), 1060)
    with pytest.raises(ProtocolError) as expired:
        verify_token(SECRET, token, now=1060)
    assert (expired.value.status, expired.value.code) == (401, ErrorCode.TOKEN_EXPIRED)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # forged signature
        lambda t: "v2" + t[2:],
        lambda t: t.split(".")[0] + "." + t.split(".")[1],
        lambda t: "garbage",
        lambda t: "v1." + "x" * 5000 + ".y",
    ],
)
def test_forged_or_malformed_tokens_are_401(mangle: object) -> None:
    token, _ = issue_token(SECRET, "dev-1", ("pytorch",), now=1000, ttl=60)

    with pytest.raises(ProtocolError) as err:
        verify_token(SECRET, mangle(token), now=1001)  # type: ignore[operator]

    assert (err.value.status, err.value.code) == (401, ErrorCode.BAD_TOKEN)


def test_token_signed_with_another_secret_is_refused() -> None:
    token, _ = issue_token(b"other", "dev-1", ("pytorch",), now=1000, ttl=60)

    with pytest.raises(ProtocolError, match="signature"):
        verify_token(SECRET, token, now=1001)


# --- manifests -------------------------------------------------------------------------


def _task(**overrides: object) -> LeafTask:
    fields: dict[str, object] = {
        "task_id": make_task_id("j", "r", 0, "leaf-0"),
        "job": "j",
        "run_id": "r",
        "round": 0,
        "leaf": "leaf-0",
        "selected_device_ids": ["d1"],
        "model_version": REF.sha256,
        "global_model": REF,
        "tensor_spec": {"w": ([2, 3], "float32")},
        "runtime": "pytorch",
        "deadline": datetime.now(UTC) + timedelta(seconds=10),
    }
    fields.update(overrides)
    return LeafTask.model_validate(fields)


def test_leaf_task_round_trips_through_json_with_a_simulation_hint() -> None:
    task = _task(data_hint={"scheme": "dirichlet", "num_devices": 40, "alpha": 0.5, "extra": 1})

    again = LeafTask.model_validate_json(task.model_dump_json())

    assert again == task
    assert again.specs() == {"w": TensorSpec((2, 3), "float32")}
    assert isinstance(again.data_hint, DataHint)
    assert again.data_hint.model_dump()["extra"] == 1  # flow-specific fields pass through


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_version": "b" * 64}, "global model's sha256"),
        ({"deadline": datetime(2030, 1, 1)}, "timezone-aware"),
        ({"tensor_spec": {}}, "tensor_spec is empty"),
        ({"leaf": "../x"}, "not a valid key segment"),
    ],
)
def test_leaf_task_refuses_inconsistent_manifests(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _task(**overrides)


def test_active_round_needs_a_manifest_per_leaf() -> None:
    with pytest.raises(ValueError, match="no entry for leaves"):
        ActiveRound(
            job="j",
            run_id="r",
            round=0,
            status="open",
            leaves=["leaf-0", "leaf-1"],
            leaf_manifest_keys={"leaf-0": "k"},
            opened_at=datetime.now(UTC),
        )


def test_registry_and_identity_keys() -> None:
    assert device_key("hello-mobile", "sim-0-00001") == "devices/hello-mobile/sim-0-00001.json"
    assert registry_prefix("hello-mobile") == "devices/hello-mobile/"
    assert identity_key("sim-0-00001") == "identities/sim-0-00001.json"
    with pytest.raises(ValueError, match="device id"):
        device_key("j", "a/b")


# --- update batch codec -------------------------------------------------------------


def _update(device: str, value: float, **kw: object) -> DeviceUpdate:
    return DeviceUpdate(
        device_id=device,
        task_id="t",
        model_version="v",
        num_samples=kw.pop("num_samples", 7),  # type: ignore[arg-type]
        tensors={"w": np.full((2, 3), value, np.float32), "block/0.bias": np.arange(3.0)},
        metrics={"loss": value},
        received_at=datetime(2026, 1, 1, tzinfo=UTC),
        gateway_id="gw-a",
    )


CTX = BatchContext(job="j", run_id="r", round=3, leaf="leaf-0", gateway_id="gw-a")


def test_batch_round_trips_in_order_with_records() -> None:
    updates = [_update("d1", 1.0), _update("d2", 2.0), _update("d3", -0.5)]

    decoded = decode_update_batch(encode_update_batch(updates, CTX), source="batch")

    assert [u.device_id for u in decoded] == ["d1", "d2", "d3"]
    for before, after in zip(updates, decoded, strict=True):
        assert after.record() == before.record()
        assert after.tensors.keys() == before.tensors.keys()
        for name in before.tensors:
            np.testing.assert_array_equal(after.tensors[name], before.tensors[name])


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 10_000), st.floats(-1e6, 1e6, allow_nan=False)),
        min_size=1,
        max_size=6,
    )
)
def test_batch_round_trip_property(rows: list[tuple[int, float]]) -> None:
    updates = [
        DeviceUpdate(f"d{i}", "t", "v", n, {"x": np.array([v], np.float32)}, {"m": v})
        for i, (n, v) in enumerate(rows)
    ]

    decoded = decode_update_batch(encode_update_batch(updates, CTX), source="batch")

    assert [(u.num_samples, u.metrics) for u in decoded] == [(n, {"m": v}) for n, v in rows]
    assert [float(u.tensors["x"][0]) for u in decoded] == [float(np.float32(v)) for _, v in rows]


def _raw_batch(tensors: dict[str, np.ndarray], records: object, version: str = "1") -> bytes:
    meta = {"canopy-update-batch": version, "records": json.dumps(records)}
    return encode_tensors(tensors, meta)


REC = {"device_id": "d", "task_id": "t", "model_version": "v", "num_samples": 1}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00" * 4, "too short"),
        (encode_tensors({"0/w": np.zeros(1)}), "format None"),
        (_raw_batch({"0/w": np.zeros(1)}, [REC], version="9"), "format '9'"),
        (_raw_batch({"0/w": np.zeros(1)}, "nope"), "non-empty JSON list"),
        (_raw_batch({"1/w": np.zeros(1)}, [REC]), "does not name one of"),
        (_raw_batch({"w": np.zeros(1)}, [REC]), "does not name one of"),
        (_raw_batch({"0/w": np.zeros(1)}, [REC, REC]), "record 1 .* has no tensors"),
        (_raw_batch({"0/w": np.zeros(1)}, [{"device_id": "d"}]), "lacks"),
        (_raw_batch({"0/w": np.zeros(1)}, [{**REC, "num_samples": -1}]), "num_samples"),
        (_raw_batch({"0/w": np.zeros(1)}, [{**REC, "metrics": {"a": "x"}}]), "metrics"),
    ],
)
def test_malformed_batches_name_the_source(data: bytes, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as err:
        decode_update_batch(data, source="s3://b/batch-7")

    assert "s3://b/batch-7" in str(err.value)


def test_empty_batch_is_refused_at_encoding() -> None:
    with pytest.raises(ValueError, match="at least one"):
        encode_update_batch([], CTX)


# --- header parsers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, 99)),
        ("bytes=-5", (95, 99)),
        ("bytes=90-500", (90, 99)),
        ("bytes=0-1,5-6", None),  # multi-range: ignored, full body
        ("items=0-1", None),
        ("bytes=x-1", None),
    ],
)
def test_range_parsing(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=5-2", "bytes=-0"])
def test_unsatisfiable_ranges_are_416(header: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_range(header, 100)
    assert err.value.status == 416


@pytest.mark.parametrize("value", [None, "0", "-3", "1.5", "abc", "99999999999", "１２", "+5"])
def test_bad_sample_counts(value: str | None) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_num_samples(value)
    assert err.value.code == ErrorCode.BAD_NUM_SAMPLES


@pytest.mark.parametrize(
    "value",
    [
        "[1]",
        "{bad",
        '{"loss": "x"}',
        '{"loss": NaN}',
        '{"loss": true}',
        json.dumps({f"m{i}": i for i in range(40)}),
    ],
)
def test_bad_metrics(value: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_metrics(value)
    assert err.value.code == ErrorCode.BAD_METRICS


def test_good_headers_parse() -> None:
    assert parse_num_samples(" 42 ") == 42
    assert parse_metrics('{"loss": 0.25, "accuracy": 1}') == {"loss": 0.25, "accuracy": 1.0}
    assert parse_metrics(None) == {}


# --- caches --------------------------------------------------------------------------


async def test_ttl_cache_single_flight_and_expiry() -> None:
    now = [0.0]
    calls = 0

    async def load() -> int:
        nonlocal calls
        calls += 1
        return calls

    cache: TtlCache[str, int] = TtlCache(lambda _: 1.0, clock=lambda: now[0])

    results = await asyncio.gather(*(cache.get("k", load) for _ in range(50)))
    now[0] = 0.5
    cached = await cache.get("k", load)
    now[0] = 2.0
    reloaded = await cache.get("k", load)

    assert results == [1] * 50 and cached == 1 and reloaded == 2


async def test_failed_loads_are_not_cached_and_bytes_cache_respects_budget() -> None:
    attempts = 0

    async def flaky() -> bytes:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OSError("store down")
        return b"x" * 60

    cache = BytesCache(max_bytes=100)
    with pytest.raises(OSError):
        await cache.get("a", flaky)
    assert await cache.get("a", flaky) == b"x" * 60

    async def other() -> bytes:
        return b"y" * 60

    await cache.get("b", other)  # evicts "a": 120 bytes would exceed the budget
    assert await cache.get("a", flaky) == b"x" * 60
    assert attempts == 3


async def test_fresh_reads_start_after_the_caller_asked_and_are_shared() -> None:
    reads = FreshReads[str, int]()
    started: list[int] = []
    gate = asyncio.Event()

    async def load() -> int:
        started.append(len(started))
        await gate.wait()
        return len(started)  # which read answered

    first = asyncio.ensure_future(reads.read("job", load))
    await asyncio.sleep(0)  # read 1 is running now
    late = [asyncio.ensure_future(reads.read("job", load)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    answers = await asyncio.gather(first, *late)

    assert answers[0] == 1  # the read it started
    assert answers[1:] == [2] * 5  # read 1 began too early for them; they shared read 2
    assert started == [0, 1]  # two loads for six callers


async def test_a_failed_fresh_read_fails_its_callers_and_is_not_reused() -> None:
    reads = FreshReads[str, int]()
    calls = 0

    async def load() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("s3 is down")
        return calls

    with pytest.raises(RuntimeError):
        await reads.read("job", load)
    assert await reads.read("job", load) == 2
