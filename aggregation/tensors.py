"""Named tensors as safetensors bytes: the only tensor wire format Canopy accepts.

Model states, device updates and partial aggregates all cross process, network
and storage boundaries as safetensors, never pickle: nothing that comes from a
device or from S3 may execute code when read. In memory they are
``dict[str, numpy.ndarray]`` (``TensorDict``), which keeps the aggregation core
free of torch and lets summing run at numpy speed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from infra.errors import ValidationError

TensorDict = dict[str, np.ndarray]


class TensorSpec(tuple[tuple[int, ...], str]):
    """(shape, dtype name) of one named tensor; a tuple so it hashes and compares."""

    __slots__ = ()

    def __new__(cls, shape: tuple[int, ...], dtype: str) -> TensorSpec:
        return super().__new__(cls, (tuple(int(d) for d in shape), str(dtype)))

    @property
    def shape(self) -> tuple[int, ...]:
        return self[0]

    @property
    def dtype(self) -> str:
        return self[1]


def spec_of(tensors: Mapping[str, np.ndarray]) -> dict[str, TensorSpec]:
    return {name: TensorSpec(arr.shape, arr.dtype.name) for name, arr in tensors.items()}


def encode_tensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise named arrays; ``metadata`` values must be strings (safetensors' rule)."""
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    # np.asarray(order="C"), not np.ascontiguousarray: the latter turns 0-d tensors
    # (e.g. BatchNorm's num_batches_tracked) into shape (1,).
    contiguous = {name: np.asarray(arr, order="C") for name, arr in tensors.items()}
    return bytes(st_save(contiguous, metadata=meta or None))


def decode_tensors(data: bytes, *, source: str = "payload") -> tuple[TensorDict, dict[str, str]]:
    """Parse safetensors bytes, naming ``source`` in the error when they are malformed."""
    if len(data) < 8:
        raise ValidationError(f"{source}: {len(data)} bytes is too short to be safetensors")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise ValidationError(
            f"{source}: safetensors header length {header_len} does not fit in {len(data)} bytes "
            "(truncated or not safetensors)"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = st_load(data)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ValidationError(f"{source}: not valid safetensors ({exc})") from exc
    metadata = header.get("__metadata__") or {}
    return dict(tensors), {str(k): str(v) for k, v in metadata.items()}
