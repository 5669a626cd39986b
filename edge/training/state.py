"""Model states: torch ``state_dict`` <-> ``TensorDict`` (numpy), and fresh initial states.

Everything outside ``edge/`` sees models as ``TensorDict`` (name -> numpy array,
safetensors on the wire); torch tensors exist only inside trainers and export.
Names are the module's own ``state_dict`` names (``conv1.weight``), which is also
what an exported program's parameters are mapped back to.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from aggregation.tensors import TensorDict
from edge.jobs.spec import JobSpec
from infra.errors import ValidationError


def state_dict_to_tensors(state_dict: Mapping[str, torch.Tensor]) -> TensorDict:
    """Detached, contiguous numpy copies (the caller may keep training the module)."""
    return {
        name: np.ascontiguousarray(t.detach().cpu().numpy()).copy()
        for name, t in state_dict.items()
    }


def tensors_to_state_dict(tensors: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Torch tensors that own their memory (safe to load and then train)."""
    return {name: torch.from_numpy(np.array(arr, copy=True)) for name, arr in tensors.items()}


def check_state_matches(module: nn.Module, state: Mapping[str, np.ndarray], *, what: str) -> None:
    """Refuse a state whose names, shapes or dtypes differ from the module's."""
    expected = {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in module.state_dict().items()
    }
    got = {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in state.items()}
    if expected.keys() != got.keys():
        missing = sorted(expected.keys() - got.keys())
        extra = sorted(got.keys() - expected.keys())
        raise ValidationError(
            f"{what}: tensor names differ from the model (missing {missing}, unexpected {extra})"
        )
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    if wrong:
        name, (have, want) = next(iter(sorted(wrong.items())))
        raise ValidationError(
            f"{what}: {len(wrong)} tensor(s) have the wrong shape/dtype, e.g. {name} is "
            f"{have} but the model expects {want}"
        )


def buffers_refusal(module: nn.Module) -> str | None:
    """Why ``module`` cannot be trained as a program, if it has buffers (else ``None``).

    ExecuTorch training programs hand back parameters only, so buffer updates
    would silently be lost on every phone.
    """
    buffers = [name for name, _ in module.named_buffers()]
    if not buffers:
        return None
    return (
        f"model has buffers {buffers[:5]}: on-device training programs only return "
        "parameters, so buffer updates (e.g. BatchNorm running statistics) would be lost; "
        "use a buffer-free normalisation such as GroupNorm/LayerNorm"
    )


def model_from_state(job: JobSpec, state: Mapping[str, np.ndarray]) -> nn.Module:
    """A fresh network of ``job`` holding ``state``'s weights."""
    module = job.build_model()
    check_state_matches(module, state, what=f"state for job {job.name}")
    module.load_state_dict(tensors_to_state_dict(state))
    return module


def initial_state(job: JobSpec, seed: int = 0) -> TensorDict:
    """The job's round-0 model, reproducible from ``seed`` (global RNG left untouched)."""
    if job.closed_form is not None:
        return job.closed_form.initial_state(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = job.build_model()
    return state_dict_to_tensors(module.state_dict())
