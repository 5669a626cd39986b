"""The server-strategy interface: how the root turns a mean update into a new model.

A strategy is plain math on ``TensorDict``s, with no I/O and no Prefect: the round
flow finalises the root ``PartialAggregate`` into a mean update, loads the server
state tensors (momentum, Adam moments) from S3, calls :meth:`Strategy.apply` and
writes both results back. ``apply`` is pure (it returns new dicts and never
mutates its inputs), so a retried task computes the same model from the same
inputs.

Sign convention: an update is ``client - global``, so a plain step is
``global + server_lr * mean_update``.

Only floating-point tensors are optimised. Integer tensors (e.g. BatchNorm's
``num_batches_tracked``) have no gradient-like meaning: they get the rounded mean
update added as-is and no server state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from aggregation.tensors import TensorDict
from infra.errors import ValidationError


def is_optimised(arr: np.ndarray) -> bool:
    """Whether a strategy steps this tensor with its optimiser (floating point only)."""
    return arr.dtype.kind == "f"


def state_dtype(param: np.ndarray) -> np.dtype:
    """Server state is stored at the parameter's precision, but never below float32."""
    return np.result_type(param.dtype, np.float32)


def check_update_fits(
    global_state: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]
) -> None:
    """Refuse a mean update whose names or shapes differ from the global model's."""
    missing = sorted(set(global_state) - set(update))
    unknown = sorted(set(update) - set(global_state))
    if missing or unknown:
        raise ValidationError(
            f"mean update does not match the global model (missing: {missing}; "
            f"unexpected: {unknown}); the model is left unchanged"
        )
    for name, param in global_state.items():
        if update[name].shape != param.shape:
            raise ValidationError(
                f"mean update for {name!r} has shape {update[name].shape}, the global model "
                f"has {param.shape}; the model is left unchanged"
            )


class Strategy(ABC):
    """A server optimiser over mean updates.

    Subclasses set ``name``, list their per-tensor state slots in ``slots`` (state
    keys are ``"{slot}/{tensor}"``), and implement :meth:`step` for one float64
    tensor; the base class does the checking, the dtype handling and the
    bookkeeping, so a new strategy is a few lines of math (see FedAvgM).
    """

    name: ClassVar[str]
    slots: ClassVar[tuple[str, ...]] = ()

    def initial_slot_value(self, slot: str) -> float:
        """Value a state slot starts at in round 0 (zero unless a paper says otherwise)."""
        return 0.0

    def params(self) -> dict[str, float]:
        """Hyperparameters, for lineage records and logs."""
        return {}

    def init_state(self, global_state: Mapping[str, np.ndarray]) -> TensorDict:
        """Server state before the first round: one tensor per slot per optimised tensor."""
        return {
            f"{slot}/{name}": np.full(
                param.shape, self.initial_slot_value(slot), state_dtype(param)
            )
            for name, param in global_state.items()
            if is_optimised(param)
            for slot in self.slots
        }

    @abstractmethod
    def step(
        self, param: np.ndarray, update: np.ndarray, state: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One tensor's step, all float64: return the new parameter and new slot values.

        ``state`` maps slot name to that tensor's current slot value. The inputs
        are fresh float64 copies and may be overwritten.
        """

    def apply(
        self,
        global_state: Mapping[str, np.ndarray],
        mean_update: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
    ) -> tuple[TensorDict, TensorDict]:
        """New global model and new server state; inputs are not modified."""
        check_update_fits(global_state, mean_update)
        expected = set(self.init_state_keys(global_state))
        if set(state) != expected:
            raise ValidationError(
                f"{self.name}: server state has keys {sorted(set(state) - expected)} too many "
                f"and {sorted(expected - set(state))} missing; was it written by another "
                "strategy or for another model? The model is left unchanged"
            )
        new_global: TensorDict = {}
        new_state: TensorDict = {}
        for name, param in global_state.items():
            update = mean_update[name]
            if not is_optimised(param):
                new_global[name] = np.asarray(param + np.rint(update).astype(param.dtype))
                continue
            slots = {}
            for slot in self.slots:
                value = state[f"{slot}/{name}"]
                if value.shape != param.shape:
                    raise ValidationError(
                        f"{self.name}: state {slot}/{name} has shape {value.shape}, "
                        f"expected {param.shape}"
                    )
                slots[slot] = value.astype(np.float64)
            new_param, new_slots = self.step(
                param.astype(np.float64), update.astype(np.float64), slots
            )
            # asarray: arithmetic on 0-d arrays yields numpy scalars, not arrays
            new_global[name] = np.asarray(new_param, dtype=param.dtype)
            for slot in self.slots:
                new_state[f"{slot}/{name}"] = np.asarray(new_slots[slot], dtype=state_dtype(param))
        return new_global, new_state

    def init_state_keys(self, global_state: Mapping[str, np.ndarray]) -> list[str]:
        """State keys ``init_state`` would produce, without allocating the tensors."""
        return [
            f"{slot}/{name}"
            for name, param in global_state.items()
            if is_optimised(param)
            for slot in self.slots
        ]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
