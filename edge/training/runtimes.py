"""Pick a device trainer by runtime name, as written in a task manifest."""

from __future__ import annotations

from edge.jobs.spec import RuntimeName
from edge.training.executorch_trainer import ExecuTorchTrainer
from edge.training.loop import DeviceTrainer
from edge.training.pytorch_trainer import PyTorchTrainer
from infra.errors import ConfigError

_TRAINERS: dict[str, DeviceTrainer] = {
    "executorch": ExecuTorchTrainer(),
    "pytorch": PyTorchTrainer(),
}


def get_trainer(runtime: RuntimeName | str) -> DeviceTrainer:
    """The trainer for ``executorch`` or ``pytorch`` (trainers are stateless and shareable)."""
    try:
        return _TRAINERS[runtime]
    except KeyError:
        raise ConfigError(
            f"unknown runtime {runtime!r}; expected one of {sorted(_TRAINERS)}"
        ) from None
