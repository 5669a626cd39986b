"""Strategy hyperparameters, declared once: in the constructor's signature.

A strategy's ``__init__`` is the single source of its hyperparameters: their
names, types, ranges (``Annotated[float, Field(gt=0)]``) and defaults. From that
signature this module derives a pydantic model, which serves two callers:

* :class:`~aggregation.strategies.base.Strategy` wraps every subclass's
  ``__init__`` so that direct construction (``FedAvgM(momentum=1.5)``) is
  validated by the same rules, with a :class:`~infra.errors.ConfigError`;
* :class:`~aggregation.strategies.config.StrategyConfig` validates a flow
  parameter (``{"name": "fedadam", "params": {"server_lr": 0.03}}``) before any
  work starts, listing every problem at once.

So a default or a range is never written twice, and a user's strategy gets the
same checks as the built-ins without writing any validation code.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from infra.errors import ConfigError

Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
"""A positive finite float, e.g. a learning rate or ``tau``."""

Decay = Annotated[float, Field(ge=0.0, lt=1.0)]
"""A decay or momentum factor in [0, 1)."""

_NOT_NAMED = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


class InvalidParams(ConfigError):
    """Hyperparameters that do not fit a strategy's signature; ``problems`` lists each one."""

    def __init__(self, label: str, problems: list[str]) -> None:
        super().__init__(f"invalid parameters for {label}: {'; '.join(problems)}")
        self.problems = problems


def label_of(cls: type) -> str:
    """How messages name a strategy class: its registered ``name``, else its class name."""
    name = getattr(cls, "name", None)
    return name if isinstance(name, str) and name else cls.__qualname__


def _own_init(cls: type) -> tuple[type, Callable[..., None]] | None:
    """The class in ``cls``'s MRO that defines ``__init__``, and that ``__init__``."""
    for klass in cls.__mro__:
        if klass is object:
            return None
        init = klass.__dict__.get("__init__")
        if init is not None:
            return klass, inspect.unwrap(init)
    return None


@functools.cache
def params_model(cls: type) -> type[BaseModel]:
    """The pydantic model of ``cls.__init__``'s parameters (all but ``self``).

    Unannotated parameters accept anything; parameters without a default are
    required. ``*args`` and ``**kwargs`` are refused: a hyperparameter must have
    a name to be validated, recorded in lineage and shown in a form.
    """
    fields: dict[str, Any] = {}
    found = _own_init(cls)
    if found is not None:
        owner, init = found
        hints = typing.get_type_hints(init, include_extras=True)
        for param in list(inspect.signature(init).parameters.values())[1:]:
            if param.kind in _NOT_NAMED or param.kind is inspect.Parameter.POSITIONAL_ONLY:
                raise ConfigError(
                    f"{owner.__qualname__}.__init__ takes {param}: strategy hyperparameters "
                    "must be named parameters (so they can be validated and recorded)"
                )
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[param.name] = (hints.get(param.name, Any), default)
    return pydantic.create_model(
        f"{cls.__qualname__}Params",
        __config__=ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True),
        **fields,
    )


def param_names(cls: type) -> list[str]:
    """Hyperparameter names of ``cls``, in signature order."""
    return list(params_model(cls).model_fields)


def validate_params(cls: type, given: Mapping[str, object], *, label: str) -> BaseModel:
    """Validate the hyperparameters ``given`` for ``cls``; unset ones keep their defaults.

    Raises
    ------
    InvalidParams
        Listing every problem: values out of range, parameters the strategy
        does not take (naming those it does take), required ones missing.
    """
    model = params_model(cls)
    try:
        return model.model_validate(dict(given))
    except pydantic.ValidationError as exc:
        takes = ", ".join(model.model_fields) or "no parameters"
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(
                    f"{where}: Extra inputs are not permitted ({label} does not use {where}; "
                    f"it takes {takes})"
                )
            elif err["type"] == "missing":
                problems.append(f"{where}: Field required")
            else:
                problems.append(f"{where}: {err['msg']} (got {err['input']!r})")
        raise InvalidParams(label, problems) from None


def given_values(model: BaseModel) -> dict[str, object]:
    """The validated values of the parameters that were set (not defaulted)."""
    return {name: getattr(model, name) for name in model.model_fields_set}


def all_values(model: BaseModel) -> dict[str, object]:
    """Every parameter's validated value, defaults included, in signature order."""
    return {name: getattr(model, name) for name in type(model).model_fields}


def validating_init(owner: type, init: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``owner.__init__`` so its arguments are validated against its own signature.

    The wrapped constructor maps positional arguments to their names, validates
    everything with :func:`validate_params` (raising ``InvalidParams``), records
    the full set of hyperparameters on the instance as ``_hyperparams`` (the
    outermost constructor wins, so a subclass calling ``super().__init__`` keeps
    its own record) and then runs the original body with the validated values.
    """
    names = [
        p.name
        for p in list(inspect.signature(init).parameters.values())[1:]
        if p.kind not in _NOT_NAMED
    ]

    @functools.wraps(init)
    def __init__(self: object, *args: object, **kwargs: object) -> None:
        if len(args) > len(names):
            raise TypeError(
                f"{owner.__qualname__}() takes {len(names)} positional hyperparameters, "
                f"got {len(args)}"
            )
        given: dict[str, object] = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key in given:
                raise TypeError(f"{owner.__qualname__}() got multiple values for {key!r}")
            given[key] = value
        model = validate_params(owner, given, label=label_of(type(self)))
        if "_hyperparams" not in vars(self):
            vars(self)["_hyperparams"] = all_values(model)
        init(self, **given_values(model))

    return __init__
