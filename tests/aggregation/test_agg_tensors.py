"""The safetensors codec keeps every tensor's shape, including 0-d ones."""

from __future__ import annotations

import numpy as np

from aggregation.tensors import TensorSpec, decode_tensors, encode_tensors, spec_of


def test_zero_dim_and_non_contiguous_tensors_round_trip() -> None:
    # Prepare: torch state dicts hold 0-d tensors (BatchNorm's num_batches_tracked)
    tensors = {
        "bn.num_batches_tracked": np.array(12, np.int64),
        "fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # a transposed view
    }

    # Execute
    back, meta = decode_tensors(encode_tensors(tensors, {"round": 3}))

    # Assert
    assert spec_of(back) == {
        "bn.num_batches_tracked": TensorSpec((), "int64"),
        "fc.weight": TensorSpec((3, 2), "float32"),
    }
    np.testing.assert_array_equal(back["fc.weight"], tensors["fc.weight"])
    assert int(back["bn.num_batches_tracked"]) == 12
    assert meta == {"round": "3"}
