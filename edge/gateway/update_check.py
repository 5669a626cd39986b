"""Is this upload body an update for this task? Pure checks, cheapest first, all 422s.

The body comes from a phone, so nothing in it is trusted: not the 8-byte header
length, not the JSON header, not the dtypes it names. ``check_header`` reads
the safetensors header by hand and compares every tensor's name, shape and
dtype with the task's spec *before* numpy sees the data. That keeps two kinds
of trouble out of the decoder: dtypes numpy cannot represent (``BF16``,
``F8_E4M3``, ``F8_E5M2``... which ``safetensors.numpy`` answers with a bare
``KeyError``), and shapes the spec never allowed (no allocation for a header
that claims a billion elements). Only then is the body decoded and checked by
``aggregation.guards`` (the same guards the leaf aggregation runs: names,
shapes, dtypes, NaN/Inf, weight and metrics).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from safetensors import SafetensorError

from aggregation.guards import UpdateRejected, check_update
from aggregation.tensors import TensorDict, TensorSpec, decode_tensors
from edge.protocol import ErrorCode, ProtocolError
from infra.errors import ValidationError

GUARD_CODES: Mapping[str, ErrorCode] = {
    "missing-tensor": ErrorCode.TENSOR_NAMES,
    "unknown-tensor": ErrorCode.TENSOR_NAMES,
    "shape": ErrorCode.TENSOR_SHAPE,
    "dtype": ErrorCode.TENSOR_DTYPE,
    "non-finite": ErrorCode.NON_FINITE,
    "bad-weight": ErrorCode.BAD_NUM_SAMPLES,
    "bad-metric": ErrorCode.BAD_METRICS,
}

# numpy dtype name (as in a task's tensor_spec) -> the safetensors header's name for it.
SAFETENSORS_DTYPES: Mapping[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "float16": "F16",
    "uint32": "U32",
    "int32": "I32",
    "float32": "F32",
    "uint64": "U64",
    "int64": "I64",
    "float64": "F64",
}

METADATA_KEY = "__metadata__"


def _malformed(source: str, detail: str) -> ProtocolError:
    return ProtocolError(422, ErrorCode.MALFORMED_UPDATE, f"{source}: {detail}")


def _rejected(
    code: ErrorCode, reason: str, tensor: str, device_id: str, detail: str
) -> ProtocolError:
    return ProtocolError(
        422,
        code,
        f"rejected tensor {tensor!r} of update from device {device_id!r} ({reason}): {detail}; "
        "the update is not summed",
        tensor=tensor,
        details={"reason": reason},
    )


def read_header(body: bytes, source: str) -> dict[str, Any]:
    """The safetensors JSON header of ``body``, or a 422 ``malformed_update``."""
    if len(body) < 8:
        raise _malformed(source, f"{len(body)} bytes is too short to be safetensors")
    size = int.from_bytes(body[:8], "little")
    if size <= 0 or 8 + size > len(body):
        raise _malformed(
            source, f"safetensors header length {size} does not fit in {len(body)} bytes"
        )
    try:
        header = json.loads(body[8 : 8 + size])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _malformed(source, f"safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _malformed(source, "safetensors header is not a JSON object")
    return header


def check_header(body: bytes, specs: Mapping[str, TensorSpec], device_id: str) -> None:
    """Refuse a body whose header does not describe exactly the spec's tensors.

    The order of the checks (missing, unknown, then per tensor shape and dtype)
    and the codes are those of ``aggregation.guards.check_update``, so a device
    gets the same answer whichever of the two catches its mistake.
    """
    source = f"update from {device_id}"
    header = read_header(body, source)
    entries = {name: entry for name, entry in header.items() if name != METADATA_KEY}
    missing = sorted(set(specs) - set(entries))
    if missing:
        detail = f"missing tensors {missing}"
        raise _rejected(ErrorCode.TENSOR_NAMES, "missing-tensor", missing[0], device_id, detail)
    unknown = sorted(set(entries) - set(specs))
    if unknown:
        detail = f"tensors not in the model {unknown[:8]}"
        raise _rejected(ErrorCode.TENSOR_NAMES, "unknown-tensor", unknown[0], device_id, detail)
    for name, (shape, dtype) in specs.items():
        entry = entries[name]
        if not isinstance(entry, dict):
            raise _malformed(source, f"header entry of tensor {name!r} is not an object")
        claimed_shape, claimed_dtype = entry.get("shape"), entry.get("dtype")
        if not isinstance(claimed_shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in claimed_shape
        ):
            raise _malformed(source, f"tensor {name!r} has no valid shape in the header")
        if tuple(claimed_shape) != tuple(shape):
            detail = f"shape {tuple(claimed_shape)}, expected {tuple(shape)}"
            raise _rejected(ErrorCode.TENSOR_SHAPE, "shape", name, device_id, detail[:200])
        expected = SAFETENSORS_DTYPES.get(dtype)
        if claimed_dtype != expected:
            detail = f"dtype {str(claimed_dtype)[:32]!r}, expected {dtype} ({expected})"
            raise _rejected(ErrorCode.TENSOR_DTYPE, "dtype", name, device_id, detail)


def decode_and_check(
    body: bytes,
    specs: Mapping[str, TensorSpec],
    device_id: str,
    num_samples: int,
    metrics: Mapping[str, float],
) -> TensorDict:
    """Parse the safetensors body and run the aggregation guards; 422 with the reason."""
    check_header(body, specs, device_id)
    try:
        tensors, _ = decode_tensors(body, source=f"update from {device_id}")
    # The header was checked above, so what is left is offsets and lengths that lie;
    # safetensors reports them as SafetensorError, our decoder as ValidationError.
    except (ValidationError, SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(422, ErrorCode.MALFORMED_UPDATE, str(exc)[:500]) from exc
    try:
        check_update(tensors, spec=specs, device_id=device_id, weight=num_samples, metrics=metrics)
    except UpdateRejected as exc:
        raise ProtocolError(
            422,
            GUARD_CODES.get(exc.reason, ErrorCode.BAD_REQUEST),
            str(exc),
            tensor=exc.tensor,
            details={"reason": exc.reason},
        ) from exc
    return tensors
