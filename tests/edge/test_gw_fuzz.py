"""Hostile input never gets a 5xx: built safetensors bodies, header bytes, ids, OpenAPI fuzzing.

The pure checks are driven by hypothesis directly (thousands of bodies a
second); the HTTP surface by hypothesis over a real gateway and by schemathesis
from the gateway's own ``/openapi.json``. Every run is bounded (a few hundred
examples, seconds each), so all of it runs in CI.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregation.tensors import TensorSpec, encode_tensors
from edge.gateway.update_check import SAFETENSORS_DTYPES, decode_and_check
from edge.manifests import DeviceRecord, device_key
from edge.protocol import ID_PATTERN, MAX_ID_CHARS, EnrolRequest, ProtocolError, valid_id
from edge.simulator.identity import DeviceKey
from infra.keys import check_segment
from infra.store import S3ObjectStore
from tests.edge.devices import (
    JOB,
    Device,
    devices_on,
    enrol_body,
    error,
    offered_device,
    open_test_round,
    update_like,
    upload_headers,
)
from tests.support.harness import GatewayThread

SPECS = {"w": TensorSpec((4, 3), "float32"), "b": TensorSpec((3,), "float32")}
# Every dtype name safetensors defines, including those numpy cannot hold.
ALL_DTYPES = [
    *SAFETENSORS_DTYPES.values(),
    "BF16",
    "F8_E4M3",
    "F8_E5M2",
    "F8_E8M0",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "C64",
]
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}
ITEM_BYTES |= {name: 2 for name in ("U16", "I16", "F16", "BF16")}
ITEM_BYTES |= {name: 4 for name in ("U32", "I32", "F32")}
ITEM_BYTES |= {name: 8 for name in ("U64", "I64", "F64")}
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def safetensors_body(header: object, data: bytes, *, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


@st.composite
def headers_and_data(draw: st.DrawFn) -> bytes:
    """A safetensors body that is plausible: right names mostly, dtypes and shapes anything."""
    names = draw(st.lists(st.sampled_from(["w", "b", "z", "w "]), min_size=0, max_size=4))
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        dtype = draw(st.sampled_from([*ALL_DTYPES, "float32", "", "F32 "]))
        shape = draw(
            st.one_of(
                st.sampled_from([[4, 3], [3], [3, 4], [], [0]]),
                st.lists(st.integers(-2, 2**40), max_size=3),
            )
        )
        items = math.prod(shape) if all(d >= 0 for d in shape) else 0
        size = ITEM_BYTES.get(dtype, 1) * min(items, 1 << 16)
        if draw(st.booleans()):
            size = draw(st.integers(0, 64))  # a lying length
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4)), st.integers())
        )
    data = b"\x00" * offset if draw(st.booleans()) else draw(st.binary(max_size=128))
    length = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    return safetensors_body(header, data, length=length)


@given(body=st.one_of(headers_and_data(), st.binary(max_size=256)))
@settings(max_examples=600, deadline=None)
def test_any_body_is_refused_with_a_422_or_accepted_as_the_spec(body: bytes) -> None:
    try:
        tensors = decode_and_check(body, SPECS, "dev-1", 10, {})
    except ProtocolError as exc:
        assert exc.status == 422, exc.message
        return
    assert {name: (arr.shape, arr.dtype.name) for name, arr in tensors.items()} == SPECS


@pytest.mark.parametrize("dtype", ["BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F16"])
def test_dtypes_numpy_cannot_hold_are_tensor_dtype_errors(dtype: str) -> None:
    item = ITEM_BYTES.get(dtype, 1)
    body = safetensors_body(
        {
            "w": {"dtype": dtype, "shape": [4, 3], "data_offsets": [0, 12 * item]},
            "b": {"dtype": "F32", "shape": [3], "data_offsets": [12 * item, 12 * item + 12]},
        },
        b"\x00" * (12 * item + 12),
    )

    with pytest.raises(ProtocolError) as refused:
        decode_and_check(body, SPECS, "dev-1", 10, {})

    assert (refused.value.status, refused.value.code, refused.value.tensor) == (
        422,
        "tensor_dtype",
        "w",
    )


# --- ids: the documented pattern is exactly what the store accepts --------------------------


def _segment_ok(value: str) -> bool:
    try:
        check_segment(value, "id")
    except ValueError:
        return False
    return True


@given(st.text(alphabet="ab9._-/\n é", max_size=MAX_ID_CHARS + 3))
@settings(max_examples=1000, deadline=None)
def test_id_rule_equals_the_key_segment_rule(value: str) -> None:
    assert valid_id(value) == _segment_ok(value)


@given(st.from_regex(ID_PATTERN, fullmatch=True).filter(lambda v: len(v) <= MAX_ID_CHARS))
@settings(max_examples=300, deadline=None)
def test_every_id_the_pattern_allows_makes_a_registry_record(value: str) -> None:
    key = DeviceKey.derive(value)
    request = EnrolRequest.model_validate(
        enrol_body(value, key, "c1.x.y", jobs=[value], runtimes=["pytorch"])
    )
    record = DeviceRecord.model_validate(
        {
            "device_id": request.device_id,
            "job": request.jobs[0],
            "runtimes": ["pytorch"],
            "enrolled_at": "2026-01-01T00:00:00Z",
            "gateway_id": "gw",
        }
    )
    assert device_key(record.job, record.device_id).endswith(f"/{value}.json")


@pytest.mark.parametrize("bad", ["a..b", "run..1", "..", "a" * 129, "-a", "a\n"])
def test_ids_outside_the_rule_are_422_at_enrolment(client: httpx.Client, bad: str) -> None:
    as_device = Device(client, bad).enrol()
    as_job = Device(client, "phone-1").enrol(job=bad)

    assert error(as_device) == (422, "bad_request")
    assert error(as_job) == (422, "bad_request")


# --- header bytes --------------------------------------------------------------------------

# What HTTP/1.1 lets through in a field value: visible ASCII, space, tab, obs-text (0x80-0xFF).
FIELD_BYTES = st.binary(max_size=80).map(
    lambda b: bytes(c for c in b if c in (9, 32) or 33 <= c <= 126 or c >= 128).strip(b" \t")
)
# Where header bytes are tried (``@given(**HEADER_FIELD)``): each field of an upload (and
# a download's Range), any bytes in it, an ``Authorization`` often led by a token's start.
HEADER_FIELD: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(
        [
            "Authorization",
            "X-Canopy-Model-Version",
            "X-Canopy-Num-Samples",
            "X-Canopy-Metrics",
            "Content-Type",
            "Range",
        ]
    ),
    "value": FIELD_BYTES,
    "prefix": st.sampled_from([b"", b"Bearer ", b"Bearer v1.e30."]),
}


def with_field(sent: dict[str, str], name: str, value: bytes, prefix: bytes) -> dict[bytes, bytes]:
    """``sent`` as raw header bytes with field ``name`` set to ``value`` (led by ``prefix``
    if it is ``Authorization``), stripped as HTTP would."""
    raw = {k.encode(): v.encode() for k, v in sent.items() if k != name}
    raw[name.encode()] = ((prefix if name == "Authorization" else b"") + value).strip(b" \t")
    return raw


def test_any_header_bytes_get_a_4xx_or_an_answer(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    device, offer = offered_device(client, s3_store)
    body = encode_tensors(update_like(0.5))

    @FUZZ
    @given(**HEADER_FIELD)
    def one(name: str, value: bytes, prefix: bytes) -> None:
        raw = with_field(upload_headers(device, offer), name, value, prefix)
        upload = client.post(str(offer["upload_url"]), content=body, headers=list(raw.items()))
        poll = client.get(
            f"/v1/jobs/{JOB}/devices/{device.device_id}/task",
            headers=[(b"Authorization", raw.get(b"Authorization", b""))],
        )
        download = client.get(
            str(offer["model"]["url"]),  # type: ignore[index]
            headers=[(b"Authorization", device.auth["Authorization"].encode()), (b"Range", value)],
        )
        for response in (upload, poll, download):
            assert response.status_code < 500, (name, value, response.text)
            if response.status_code >= 400:
                assert response.json()["code"], response.text

    one()
    assert client.get("/healthz").status_code == 200


def test_non_ascii_authorization_is_a_bad_token(client: httpx.Client) -> None:
    response = client.get(
        f"/v1/jobs/{JOB}/devices/phone-1/task",
        headers=[(b"Authorization", "Bearer v1.abc.é".encode("latin-1"))],
    )

    assert error(response) == (401, "bad_token")


def test_405_names_the_allowed_methods(client: httpx.Client) -> None:
    response = client.delete("/v1/enrol")

    assert error(response) == (405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"


# --- schemathesis over the published OpenAPI document -----------------------------------


def test_openapi_fuzzing_with_a_valid_token_finds_no_5xx(
    s3_store: S3ObjectStore, gateway: GatewayThread, client: httpx.Client
) -> None:
    """Every operation of /openapi.json, positive and negative data, never a 5xx.

    Half of the cases are pinned to the real device, job, task, token and model
    version, so that generated headers and bodies reach the checks behind them.
    """
    me = devices_on("leaf-0", 1)[0]
    device = Device(client, me)
    device.enrol()
    open_test_round(s3_store, [me])
    offer = device.offer()
    real = {"job": JOB, "device_id": me, "task_id": str(offer["task_id"])}
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    seen: dict[str, set[int]] = {}

    def fuzz(operation: schemathesis.APIOperation[Any, Any, Any, Any]) -> None:
        cases = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes))

        @settings(
            max_examples=35,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=cases, pin=st.booleans())
        def one(case: schemathesis.Case[Any], pin: bool) -> None:
            headers = dict(case.headers or {})
            headers.setdefault("Authorization", device.auth["Authorization"])
            if pin and isinstance(case.path_parameters, dict):
                for name in case.path_parameters:
                    case.path_parameters[name] = real[name]
                headers["Authorization"] = device.auth["Authorization"]
                if "X-Canopy-Model-Version" in headers:
                    headers["X-Canopy-Model-Version"] = str(offer["model_version"])
            response = case.call(base_url=gateway.url, headers=headers, timeout=30)
            seen.setdefault(operation.label, set()).add(response.status_code)
            assert response.status_code < 500, (operation.label, response.text[:300])

        one()

    for operation in operations:
        fuzz(operation)

    assert set(seen) == {operation.label for operation in operations}
    upload = "POST /v1/jobs/{job}/devices/{device_id}/tasks/{task_id}/result"
    assert 422 in seen[upload]  # generated bodies reached the tensor checks
    assert client.get("/healthz").status_code == 200


def test_bodies_numpy_cannot_hold_are_422_over_http(
    s3_store: S3ObjectStore, client: httpx.Client
) -> None:
    device, offer = offered_device(client, s3_store)
    w = encode_tensors({"w": np.zeros((4, 3), np.float16)})  # 2-byte items, like BF16
    header_len = int.from_bytes(w[:8], "little")
    header = json.loads(w[8 : 8 + header_len])
    header["w"]["dtype"] = "BF16"
    header["b"] = {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}
    body = safetensors_body(header, w[8 + header_len :] + b"\x00" * 12)

    refused = device.upload(offer, body=body)

    assert error(refused) == (422, "tensor_dtype") and refused.json()["tensor"] == "w"
