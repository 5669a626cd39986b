"""Export a job's training program once; give each round its weights by patching bytes.

Exporting LeNet to ExecuTorch takes ~5 s and its parity gate ~4 s more, every
round, although only the weights change between rounds: the graph, the
operators and the memory plan stay the same. The ``.pte`` stores each
parameter's initial value as raw little-endian bytes in its constant data, so
a program for new weights is the template with those byte ranges overwritten.

``make_template`` finds each parameter's bytes in a freshly exported, parity-
verified program (and refuses when any is not found exactly once: nothing is
ever patched by guess). ``patch_weights`` writes a round's weights at those
offsets, and ``verify_patched`` loads the result in the ExecuTorch runtime and
checks that the program holds exactly the round's weights before it is
published. Pure functions: bytes and arrays in, bytes out.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregation.tensors import TensorDict, TensorSpec, spec_of
from edge.jobs.spec import JobSpec
from edge.training.errors import ExportError, ProgramError
from edge.training.executorch_trainer import check_program_holds
from edge.training.program import TrainingProgram


@dataclass(frozen=True)
class ProgramTemplate:
    """An exported program plus where each parameter's bytes sit in it."""

    pte: bytes
    offsets: dict[str, int]
    spec: dict[str, TensorSpec]

    def layout_json(self) -> str:
        """Offsets and spec as JSON, stored beside the template in S3."""
        return json.dumps(
            {
                "offsets": self.offsets,
                "spec": {k: [list(s.shape), s.dtype] for k, s in self.spec.items()},
            },
            sort_keys=True,
        )

    @classmethod
    def from_layout(cls, pte: bytes, layout: str) -> ProgramTemplate:
        raw = json.loads(layout)
        spec = {k: TensorSpec(tuple(shape), dtype) for k, (shape, dtype) in raw["spec"].items()}
        return cls(pte=pte, offsets={k: int(v) for k, v in raw["offsets"].items()}, spec=spec)


def _raw(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def make_template(pte: bytes, state: Mapping[str, np.ndarray]) -> ProgramTemplate:
    """Locate every parameter of ``state`` (the weights ``pte`` was exported from)."""
    offsets: dict[str, int] = {}
    for name, arr in state.items():
        needle = _raw(arr)
        first = pte.find(needle)
        if first < 0 or pte.find(needle, first + 1) >= 0:
            found = "not found" if first < 0 else "found more than once"
            raise ExportError(
                f"parameter {name!r} is {found} in the exported program, so its weights cannot "
                "be patched per round; export each round instead"
            )
        offsets[name] = first
    spans = sorted((off, off + len(_raw(state[n]))) for n, off in offsets.items())
    if any(a_end > b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans)):
        raise ExportError("parameter byte ranges overlap in the exported program")
    return ProgramTemplate(pte=bytes(pte), offsets=offsets, spec=spec_of(state))


def patch_weights(template: ProgramTemplate, state: Mapping[str, np.ndarray]) -> bytes:
    """The template's program holding ``state``'s weights (same names, shapes, dtypes)."""
    found = spec_of(state)
    if found != template.spec:
        raise ProgramError(
            f"weights {sorted(found)} do not match the program template's "
            f"{sorted(template.spec)} (names, shapes and dtypes must be equal)"
        )
    out = bytearray(template.pte)
    for name, offset in template.offsets.items():
        raw = _raw(state[name])
        out[offset : offset + len(raw)] = raw
    return bytes(out)


def verify_patched(job: JobSpec, pte: bytes, state: TensorDict) -> None:
    """Load the patched program and check it holds exactly ``state`` (raises otherwise)."""
    program = TrainingProgram(pte)
    x, y = job.make_example_batch(program.batch_size, 0)
    program.forward_backward(
        np.asarray(x, dtype=np.float32), np.asarray(y, dtype=job.target_dtype)
    )  # parameters become visible after the first pass; no optimizer step is taken
    check_program_holds(program, state)
