"""On-device training: ExecuTorch export, device trainers, parity gate, evaluation.

What the gateway, simulator and flows call:

* ``export_job_program`` / ``export_program`` (pure) and ``publish_program``
  (store + lineage, behind the parity gate);
* ``ExecuTorchTrainer`` and ``PyTorchTrainer`` (``DeviceTrainer``s),
  ``get_trainer(runtime)``, ``RoundModel`` in, ``TrainResult`` out; both are
  ``train_locally`` (the one device loop) with their runtime's ``LocalStep``;
* ``evaluate`` (``evaluate_sums``, summable) for held-out sets; ``check_parity``;
* ``initial_state``, ``state_dict_to_tensors``, ``tensors_to_state_dict``.
"""

from edge.training.errors import ExportError, ParityError, ProgramError, TrainingError
from edge.training.evaluate import evaluate, evaluate_sums
from edge.training.executorch_trainer import ExecuTorchStep, ExecuTorchTrainer
from edge.training.export import ExportedProgram, ProgramInfo, export_job_program, export_program
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
