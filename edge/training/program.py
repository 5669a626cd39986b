"""A loaded ExecuTorch training program that owns its bytes, behind checks.

Two upstream sharp edges are handled here:

* the training module does not keep the ``.pte`` buffer it was loaded from alive
  (pytorch/executorch issue 10725), so :class:`TrainingProgram` holds the bytes
  for exactly as long as it holds the module;
* bytes from the network may be truncated or corrupted, and the ExecuTorch 1.5.1
  runtime is not robust to that: some corrupted programs pass its
  ``InternalConsistency`` verification and then crash the process (a segfault in
  ``method_meta`` on a corrupted input tag, found by
  ``tests/training/test_train_program_bytes.py``). So the first check is the
  sha256 the task manifest gives for the program (``expected_sha256``); then the
  flatbuffer identifier ``ET12`` at offset 4 and the extended header's sizes
  against the actual length; only then does the runtime load it, and its
  ``RuntimeError``s become :class:`ProgramError` naming what was wrong.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

from edge.training.errors import ProgramError
from edge.training.et_runtime import (
    TrainingModule,
    Verification,
    _load_for_executorch_from_buffer,
)
from edge.training.wrapper import network_name

FORWARD = "forward"
PROGRAM_IDENTIFIER = b"ET12"
_EXTENDED_HEADER_MAGIC = b"eh00"
_REQUIRED_METHODS = (
    FORWARD,
    "__et_training_fqn_forward",
    "__et_training_gradients_index_forward",
    "__et_training_parameters_index_forward",
)


def validate_program_bytes(data: bytes) -> None:
    """Cheap structural checks that catch truncation and non-programs before loading.

    Layout (ExecuTorch ``schema/extended_header.h``): bytes 0-3 flatbuffer root
    offset, 4-7 the file identifier ``ET12``, then at 8 an extended header ``eh00``,
    its length (u32), program size (u64), segment base offset (u64) and segment
    data size (u64), all little-endian.
    """
    if len(data) < 8:
        raise ProgramError(f"training program is {len(data)} bytes: too short to be a .pte file")
    ident = bytes(data[4:8])
    if ident != PROGRAM_IDENTIFIER:
        raise ProgramError(
            f"not an ExecuTorch program: file identifier at offset 4 is {ident!r}, "
            f"expected {PROGRAM_IDENTIFIER!r}"
        )
    if bytes(data[8:12]) != _EXTENDED_HEADER_MAGIC or len(data) < 32:
        return  # an older layout without the extended header: the runtime checks the rest
    header_len, program_size, segment_base = struct.unpack_from("<IQQ", data, 12)
    segment_size = (
        struct.unpack_from("<Q", data, 32)[0] if header_len >= 32 and len(data) >= 40 else 0
    )
    expected = max(program_size, segment_base + segment_size if segment_base else 0)
    if len(data) < expected:
        raise ProgramError(
            f"training program is truncated: its header promises {expected} bytes, got {len(data)}"
        )


class TrainingProgram:
    """One ``.pte`` training program, loaded for training, with the bytes it came from.

    :meth:`parameters` uses the network's ``state_dict`` names (``conv1.weight``);
    :meth:`program_parameters` and :meth:`program_gradients` keep the program's
    own names (``model.conv1.weight``) because ExecuTorch's optimizer matches
    gradients to parameters by them.
    """

    def __init__(self, pte: bytes, *, expected_sha256: str | None = None) -> None:
        if expected_sha256 is not None:
            actual = hashlib.sha256(pte).hexdigest()
            if actual != expected_sha256:
                raise ProgramError(
                    f"training program sha256 {actual[:12]}... is not the expected "
                    f"{expected_sha256[:12]}...: corrupted or replaced in transit, not loaded"
                )
        validate_program_bytes(pte)
        self._pte = bytes(pte)  # owned for the module's whole life (issue 10725)
        try:
            module = _load_for_executorch_from_buffer(
                self._pte, program_verification=Verification.InternalConsistency
            )
            methods = set(module.method_names())  # forces the program load
            missing = [m for m in _REQUIRED_METHODS if m not in methods]
            if missing:
                raise ProgramError(
                    f"program lacks method(s) {missing}: it is not an ExecuTorch training program"
                )
            meta = module.method_meta(FORWARD)
            self.input_shapes = [
                tuple(int(d) for d in meta.input_tensor_meta(i).sizes())
                for i in range(meta.num_inputs())
            ]
        except RuntimeError as exc:
            raise ProgramError(f"the ExecuTorch runtime cannot load this program: {exc}") from exc
        self._module = module
        self._training = TrainingModule(module)
        self._program_names: dict[str, str] = {}

    @property
    def pte(self) -> bytes:
        return self._pte

    @property
    def batch_size(self) -> int:
        """The static batch size the program was exported for."""
        return self.input_shapes[0][0]

    def forward_backward(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """One forward and backward pass; returns (loss, predicted classes)."""
        if tuple(x.shape) != self.input_shapes[0] or tuple(y.shape) != self.input_shapes[1]:
            raise ProgramError(
                f"batch shapes x{tuple(x.shape)}, y{tuple(y.shape)} do not match the program's "
                f"inputs x{self.input_shapes[0]}, y{self.input_shapes[1]}"
            )
        inputs = (torch.from_numpy(x), torch.from_numpy(y))
        try:
            loss, predictions = self._training.forward_backward(FORWARD, inputs)
        except RuntimeError as exc:
            raise ProgramError(f"the program failed to run forward_backward: {exc}") from exc
        if not self._program_names:
            self._program_names = {network_name(n): n for n in self._training.named_parameters()}
        return float(loss.item()), predictions.numpy()

    def program_parameters(self) -> dict[str, torch.Tensor]:
        """The program's live parameter tensors under its own names (for the optimizer).

        They alias the program's memory: an optimizer step changes the weights the
        next ``forward_backward`` uses. Available after the first ``forward_backward``.
        """
        return self._training.named_parameters()

    def program_gradients(self) -> dict[str, torch.Tensor]:
        """Gradients of the last ``forward_backward`` under the program's own names."""
        return self._training.named_gradients()

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of the current weights under the network's ``state_dict`` names.

        Like ExecuTorch's ``named_parameters``, available after the first
        ``forward_backward``.
        """
        if not self._program_names:
            raise ProgramError("parameters are only available after the first forward_backward")
        live = self._training.named_parameters()
        return {
            name: live[program_name].detach().numpy().copy()
            for name, program_name in self._program_names.items()
        }
