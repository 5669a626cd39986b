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

Besides ``apply`` (the server step), a strategy may steer the devices:
:meth:`Strategy.configure_round` returns the client hyperparameters of a round
(a decaying local learning rate, say); by default they are the job's, unchanged.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from aggregation.strategies.params import label_of, validating_init
from aggregation.tensors import TensorDict
from infra.errors import ValidationError

ClientHyperparams = dict[str, Any]
"""Client hyperparameters of a round, e.g. ``{"lr": 0.05, "local_epochs": 1, "batch_size":
16, "momentum": 0.0, "max_steps": None}``. Their schema belongs to the job (``edge``), which
validates what a strategy returns; values are JSON scalars, hence ``Any`` here."""


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

    Hyperparameters are the keyword parameters of the subclass's ``__init__``,
    annotated with their ranges (``server_lr: Positive = 1.0``): the base class
    validates every construction against that signature (a ``ConfigError``
    listing each problem), records the values for :meth:`params`, and
    ``StrategyConfig`` validates flow parameters by the same rules. So defaults
    and ranges are written once, in the signature, and ``__init__`` only stores.
    """

    name: ClassVar[str]
    slots: ClassVar[tuple[str, ...]] = ()
    _hyperparams: dict[str, object]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            # setattr: mypy refuses assigning to a method, and this is what it is for
            setattr(cls, "__init__", validating_init(cls, init))  # noqa: B010

    def initial_slot_value(self, slot: str) -> float:
        """Value a state slot starts at in round 0 (zero unless a paper says otherwise)."""
        return 0.0

    def params(self) -> dict[str, object]:
        """Hyperparameters (defaults included), for lineage records and logs."""
        return dict(vars(self).get("_hyperparams", {}))

    def configure_round(self, rnd: int, hyperparams: Mapping[str, Any]) -> ClientHyperparams:
        """Client hyperparameters for round ``rnd``, given the job's defaults.

        Override to schedule what devices do (a local learning rate that decays
        with the round, more local epochs later on). Must be pure: the same
        inputs give the same answer, so a resumed run plans the same round.
        ``hyperparams`` is read-only; return a new dict. Keys left out keep the
        job's value; keys the job does not define are refused. The default
        returns the job's hyperparameters unchanged.
        """
        return dict(hyperparams)

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


def _is_json_scalar(value: object) -> bool:
    if value is None or isinstance(value, bool | str):
        return True
    return isinstance(value, int | float) and math.isfinite(value)


def round_hyperparams(
    strategy: Strategy, *, rnd: int, defaults: Mapping[str, Any]
) -> ClientHyperparams:
    """What devices train with in round ``rnd``: ``strategy.configure_round``, checked.

    The hook sees a read-only copy of ``defaults`` (so it cannot change the
    job's values behind the caller's back); its answer is merged over the
    defaults and refused with ``ValidationError`` if it names a hyperparameter
    the job does not define or a value that is not a finite JSON scalar. Value
    ranges (``lr > 0``) are the job's schema, checked by the caller.
    """
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise ValidationError(f"round must be an int >= 0, got {rnd!r}")
    base = dict(defaults)
    who = f"{label_of(type(strategy))}.configure_round"
    answer = strategy.configure_round(rnd, MappingProxyType(dict(base)))
    if not isinstance(answer, Mapping):
        raise ValidationError(f"{who} returned {type(answer).__name__}, not a mapping")
    unknown = sorted(str(k) for k in answer if k not in base)
    if unknown:
        raise ValidationError(
            f"{who} set {unknown}, which the job does not define "
            f"(it defines {sorted(base)}); devices would not understand them"
        )
    bad = sorted(k for k, v in answer.items() if not _is_json_scalar(v))
    if bad:
        raise ValidationError(
            f"{who} gave {bad} values that are not finite JSON "
            f"scalars ({', '.join(repr(answer[k]) for k in bad)})"
        )
    return {**base, **answer}
