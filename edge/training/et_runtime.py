"""The one import point for ExecuTorch's (experimental) export and training APIs.

ExecuTorch 1.5.1 marks these APIs experimental and warns on every call, and
importing ``executorch.exir`` makes torchao log missing CUDA kernels. None of that
is actionable on a CPU machine, so it is silenced here, narrowly (by category and
logger), and every other module imports ExecuTorch through this one: when an
API moves upstream, only this file changes.
"""

from __future__ import annotations

import logging
import warnings

# Before the imports below: torchao logs "Failed to load ..." for GPU-only kernels,
# and torch's pytree logger warns about an Enum registration inside torchao.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from executorch.exir import EdgeCompileConfig, ExecutorchProgramManager, to_edge  # noqa: E402
from executorch.exir._warnings import ExperimentalWarning  # noqa: E402

warnings.filterwarnings("ignore", category=ExperimentalWarning)

from executorch.extension.pybindings.portable_lib import (  # noqa: E402
    ExecuTorchModule,
    Verification,
    _load_for_executorch_from_buffer,
)
from executorch.extension.training import TrainingModule, get_sgd_optimizer  # noqa: E402
from executorch.runtime import Runtime  # noqa: E402
from torch.export.experimental import _export_forward_backward  # noqa: E402

__all__ = [
    "EdgeCompileConfig",
    "ExecuTorchModule",
    "ExecutorchProgramManager",
    "Runtime",
    "TrainingModule",
    "Verification",
    "_export_forward_backward",
    "_load_for_executorch_from_buffer",
    "get_sgd_optimizer",
    "registered_operators",
    "to_edge",
]


def registered_operators() -> set[str]:
    """Operator names (``aten::mm.out``) the linked ExecuTorch runtime has kernels for."""
    return set(Runtime.get().operator_registry.operator_names)
