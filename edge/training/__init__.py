"""On-device training: ExecuTorch export, device trainers, parity gate, evaluation.

What the gateway, simulator and flows call:

* ``export_job_program`` / ``export_program`` (pure) and ``publish_program``
  (store + lineage, behind the parity gate);
* ``ExecuTorchTrainer`` and ``PyTorchTrainer`` (``DeviceTrainer``s),
  ``get_trainer(runtime)``, ``RoundModel`` in, ``TrainResult`` out;
* ``evaluate`` for held-out test sets; ``check_parity``;
* ``initial_state``, ``state_dict_to_tensors``, ``tensors_to_state_dict``.

Names are loaded on first use (PEP 562): importing ``edge.training.evaluate``
for a PyTorch run must not pay for ExecuTorch (seconds of import here), which
an eager ``from edge.training.export import ...`` in this file would.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Eager, because the submodule has the function's name: once anything imports
# edge.training.evaluate, Python binds the package attribute to the module, and a
# lazy lookup would never run. It loads torch only, not ExecuTorch.
from edge.training.evaluate import evaluate, evaluate_sums

# name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ExecuTorchStep": "edge.training.executorch_trainer",
    "train_locally": "edge.training.loop",
    "PyTorchStep": "edge.training.pytorch_trainer",
    "LocalStep": "edge.training.trainer",
    "StepFactory": "edge.training.trainer",
    "ExportError": "edge.training.errors",
    "ParityError": "edge.training.errors",
    "ProgramError": "edge.training.errors",
    "TrainingError": "edge.training.errors",
    "ExecuTorchTrainer": "edge.training.executorch_trainer",
    "ExportedProgram": "edge.training.export",
    "ProgramInfo": "edge.training.export",
    "export_job_program": "edge.training.export",
    "export_program": "edge.training.export",
    "ParityReport": "edge.training.parity",
    "check_parity": "edge.training.parity",
    "TrainingProgram": "edge.training.program",
    "validate_program_bytes": "edge.training.program",
    "PublishedProgram": "edge.training.publish",
    "VerifiedProgram": "edge.training.publish",
    "export_verified": "edge.training.publish",
    "publish_program": "edge.training.publish",
    "PyTorchTrainer": "edge.training.pytorch_trainer",
    "get_trainer": "edge.training.runtimes",
    "initial_state": "edge.training.state",
    "model_from_state": "edge.training.state",
    "state_dict_to_tensors": "edge.training.state",
    "tensors_to_state_dict": "edge.training.state",
    "DeviceTrainer": "edge.training.loop",
    "RoundModel": "edge.training.trainer",
    "TrainResult": "edge.training.trainer",
}

__all__ = [
    "DeviceTrainer",
    "ExecuTorchStep",
    "ExecuTorchTrainer",
    "ExportError",
    "ExportedProgram",
    "LocalStep",
    "ParityError",
    "ParityReport",
    "ProgramError",
    "ProgramInfo",
    "PublishedProgram",
    "PyTorchStep",
    "PyTorchTrainer",
    "RoundModel",
    "StepFactory",
    "TrainResult",
    "TrainingError",
    "TrainingProgram",
    "VerifiedProgram",
    "check_parity",
    "evaluate",
    "evaluate_sums",
    "export_job_program",
    "export_program",
    "export_verified",
    "get_trainer",
    "initial_state",
    "model_from_state",
    "publish_program",
    "state_dict_to_tensors",
    "tensors_to_state_dict",
    "train_locally",
    "validate_program_bytes",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from edge.training.errors import ExportError, ParityError, ProgramError, TrainingError
    from edge.training.executorch_trainer import ExecuTorchStep, ExecuTorchTrainer
    from edge.training.export import (
        ExportedProgram,
        ProgramInfo,
        export_job_program,
        export_program,
    )
    from edge.training.loop import DeviceTrainer, train_locally
    from edge.training.parity import ParityReport, check_parity
    from edge.training.program import TrainingProgram, validate_program_bytes
    from edge.training.publish import (
        PublishedProgram,
        VerifiedProgram,
        export_verified,
        publish_program,
    )
    from edge.training.pytorch_trainer import PyTorchStep, PyTorchTrainer
    from edge.training.runtimes import get_trainer
    from edge.training.state import (
        initial_state,
        model_from_state,
        state_dict_to_tensors,
        tensors_to_state_dict,
    )
    from edge.training.trainer import LocalStep, RoundModel, StepFactory, TrainResult
