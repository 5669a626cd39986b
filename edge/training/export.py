"""ExecuTorch export: a network, its loss and an example batch in; ``.pte`` bytes and facts out.

Pure (no I/O): ``publish.py`` is the wrapper that stores the program and writes
its lineage. The pipeline is the one ExecuTorch documents for on-device training:

1. ``torch.export.export`` of :class:`LossAndPredictions` (loss is output 0);
2. ``_export_forward_backward`` adds the backward graph and gradient outputs;
3. **max-pool workaround**: ExecuTorch's portable ``max_pool2d_with_indices_backward``
   kernel never zeroes its output buffer (pytorch/executorch issue 21686), so
   every step adds the previous step's gradient again and Conv -> MaxPool networks
   train to garbage or NaN. Decomposing that op into scatter/add ops that do
   start from zeros avoids the kernel entirely;
4. ``to_edge`` and ``to_executorch``;
5. the program is checked against the runtime that will run it: every operator
   must have a registered kernel (the error names the missing ones), and every
   method must load. A model the phone cannot run fails here, at export, not on
   a thousand phones mid-round.

The program bakes in the weights it was exported with; the round flow exports
the global model every round (a few seconds for LeNet).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch._decomp import get_decompositions

from aggregation.tensors import TensorDict
from edge.jobs.spec import JobSpec, LossFn, TaskKind
from edge.training.errors import ExportError
from edge.training.et_runtime import (
    EdgeCompileConfig,
    ExecutorchProgramManager,
    Runtime,
    _export_forward_backward,
    registered_operators,
    to_edge,
)
from edge.training.state import buffers_refusal, model_from_state
from edge.training.wrapper import LossAndPredictions, network_name

FQN_METHOD = "__et_training_fqn_forward"


class ProgramInfo(BaseModel):
    """What an exported training program is, recorded in lineage and shown by the CLI."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    size_bytes: int
    batch_size: int
    parameter_names: list[str]
    parameter_shapes: dict[str, list[int]]
    parameter_dtypes: dict[str, str]
    input_shapes: list[list[int]]
    input_dtypes: list[str]
    operators: list[str]
    maxpool_backward_decomposed: bool
    executorch_version: str
    torch_version: str
    export_seconds: float


@dataclass(frozen=True)
class ExportedProgram:
    """The ``.pte`` bytes and their description."""

    pte: bytes
    info: ProgramInfo


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _program_operators(executorch_program: object) -> list[str]:
    names: set[str] = set()
    for plan in executorch_program.execution_plan:  # type: ignore[attr-defined]
        for op in plan.operators:
            names.add(f"{op.name}.{op.overload}" if op.overload else op.name)
    return sorted(names)


def _check_runtime_can_run(pte: bytes, operators: list[str]) -> list[str]:
    """Missing kernels by name, then a real load of every method; returns parameter names."""
    missing = sorted(set(operators) - registered_operators())
    if missing:
        raise ExportError(
            f"the ExecuTorch runtime has no kernel for {', '.join(missing)}; a phone could not "
            "run this program. Change the model to avoid these operators (or link a runtime "
            "that registers them)."
        )
    try:
        program = Runtime.get().load_program(pte)
        for method in sorted(program.method_names):
            if program.load_method(method) is None:
                raise ExportError(f"the ExecuTorch runtime could not load method {method!r}")
        fqn_method = program.load_method(FQN_METHOD)
        if fqn_method is None:
            raise ExportError(f"program has no {FQN_METHOD} method: not a training program")
        names = [str(n) for n in fqn_method.execute([])]
    except RuntimeError as exc:
        raise ExportError(f"the ExecuTorch runtime refused the exported program: {exc}") from exc
    return names


def _lower(
    wrapper: nn.Module, example: tuple[torch.Tensor, torch.Tensor], decompose: bool
) -> ExecutorchProgramManager:
    """Steps 1-4 of the module docstring, with export-time warnings kept out of the logs.

    torch.export and EXIR warn about their own internals (pytree deprecations,
    unset ``out`` kwargs in memory planning): nothing a job author can act on.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=r".*kwarg value is None", category=UserWarning)
        exported = torch.export.export(wrapper, example, strict=True)
        joint = _export_forward_backward(exported)
        if decompose:
            joint = joint.run_decompositions(
                get_decompositions([torch.ops.aten.max_pool2d_with_indices_backward])
            )
        edge = to_edge(joint, compile_config=EdgeCompileConfig(_check_ir_validity=False))
        return edge.to_executorch()


def export_program(
    module: nn.Module,
    loss: LossFn,
    example: tuple[torch.Tensor, torch.Tensor],
    *,
    task: TaskKind = "classification",
    decompose_maxpool_backward: bool = True,
) -> ExportedProgram:
    """Export ``module`` + ``loss`` as an ExecuTorch training program.

    Parameters
    ----------
    module:
        The network (logits out), holding the weights to bake in. Parameters only:
        a module with buffers (e.g. BatchNorm statistics) is refused, since the
        program cannot hand buffer updates back.
    loss:
        ``loss(logits, labels) -> scalar``, computed inside the program.
    example:
        ``(x, y)`` of the batch shape every training step will use; the program's
        shapes are static, so its batch size is ``x.shape[0]``.
    task:
        What the program's second output is: predicted classes (classification)
        or the network's values (regression).
    decompose_maxpool_backward:
        Apply the max-pool backward workaround (default: True). False exists only
        so the regression test can show the upstream bug.

    Raises
    ------
    ExportError
        When tracing fails, the module has buffers, the runtime lacks a kernel (the
        error names it) or the program does not load.
    """
    started = time.perf_counter()
    refusal = buffers_refusal(module)
    if refusal is not None:
        raise ExportError(refusal)
    wrapper = LossAndPredictions(module, loss, task).train()
    try:
        et_program = _lower(wrapper, example, decompose_maxpool_backward)
    except Exception as exc:  # torch.export raises many unrelated types; name the step instead
        raise ExportError(
            f"exporting the training program failed: {type(exc).__name__}: {exc}"
        ) from exc
    pte = bytes(et_program.buffer)
    operators = _program_operators(et_program.executorch_program)
    program_names = _check_runtime_can_run(pte, operators)

    params = dict(module.named_parameters())
    mapped = [network_name(n) for n in program_names]
    if sorted(mapped) != sorted(params):
        raise ExportError(
            f"program parameters {sorted(mapped)} do not map onto the model's {sorted(params)}"
        )
    x, y = example
    return ExportedProgram(
        pte=pte,
        info=ProgramInfo(
            sha256=hashlib.sha256(pte).hexdigest(),
            size_bytes=len(pte),
            batch_size=int(x.shape[0]),
            parameter_names=mapped,
            parameter_shapes={n: list(params[n].shape) for n in mapped},
            parameter_dtypes={n: str(params[n].dtype).removeprefix("torch.") for n in mapped},
            input_shapes=[list(x.shape), list(y.shape)],
            input_dtypes=[str(x.dtype).removeprefix("torch."), str(y.dtype).removeprefix("torch.")],
            operators=operators,
            maxpool_backward_decomposed=decompose_maxpool_backward,
            executorch_version=_version("executorch"),
            torch_version=_version("torch"),
            export_seconds=round(time.perf_counter() - started, 3),
        ),
    )


def example_tensors(
    job: JobSpec, batch_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The job's example batch as torch tensors (``float32`` features, ``int64`` labels or
    ``float32`` regression targets)."""
    x, y = job.make_example_batch(batch_size, seed)
    return torch.from_numpy(np.asarray(x, dtype=np.float32)), torch.from_numpy(
        np.asarray(y, dtype=job.target_dtype)
    )


def export_job_program(
    job: JobSpec,
    state: TensorDict,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    decompose_maxpool_backward: bool = True,
) -> ExportedProgram | None:
    """Export ``job``'s network holding ``state`` (the round's global model).

    Returns ``None`` for closed-form jobs (hello-mobile): they have no program,
    and devices train them with numpy on every runtime.
    """
    if not job.has_program:
        return None
    if "executorch" not in job.runtimes:
        raise ExportError(f"job {job.name} does not support the executorch runtime")
    module = model_from_state(job, state)
    example = example_tensors(job, batch_size or job.hyperparams.batch_size, seed)
    return export_program(
        module,
        job.loss,
        example,
        task=job.task,
        decompose_maxpool_backward=decompose_maxpool_backward,
    )
