"""``StrategyConfig`` and ``make_strategy``: the validated boundary from run config to strategy.

A run's strategy arrives as a flow parameter or a job file, so it is validated
here, before any work starts, and refused with a :class:`~infra.errors.ConfigError`
that lists every problem at once. The config is deliberately small, so Prefect
renders it as a two-field form and it stays JSON: ``name`` (a registered name
such as ``"fedadam"``, or a ``module:ATTR`` / ``path/to/file.py:ATTR`` reference
to a user's Strategy subclass) and ``params`` (that strategy's hyperparameters).

What the hyperparameters are, their ranges and their defaults is read from the
strategy's constructor (``aggregation.strategies.params``), never restated here,
so opening the strategy set to users did not need a table per strategy. A
parameter the chosen strategy does not take (``momentum`` for FedAdam, say) is
an error rather than silently ignored: it almost always means a typo or a wrong
name.

The flat form of earlier configs, ``{"name": "fedadam", "server_lr": 0.03}``, is
still accepted (and is what ``prefect.yaml`` holds): keys beside ``name`` are
read as ``params``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from aggregation.strategies.base import Strategy
from aggregation.strategies.params import InvalidParams, validate_params
from aggregation.strategies.registry import (
    REFERENCE_HELP,
    REGISTRY,
    UnknownStrategy,
    quoted_choices,
)
from infra.errors import ConfigError

_FIELDS = frozenset({"name", "params"})


def _flat_keys_allowed(schema: dict[str, Any]) -> None:
    # The JSON schema (what Prefect's server checks deployment parameters against)
    # must accept the flat form too; the Python side moves those keys into params.
    schema.pop("additionalProperties", None)


class StrategyConfig(BaseModel):
    """Server strategy and its hyperparameters, as given in a job or flow run."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_flat_keys_allowed)

    name: str = Field(
        min_length=1,
        description="Server strategy: fedavg, fedavgm, fedadam, fedyogi (or another "
        "registered name), or your own Strategy subclass as package.module:ATTR or "
        "path/to/file.py:ATTR.",
        examples=["fedavg", "fedadam", "my_strategies.py:DecayingLr"],
    )
    params: dict[str, JsonValue] = Field(
        default_factory=dict,
        description='Hyperparameters of that strategy, e.g. {"server_lr": 0.03}; '
        "those left out take the strategy's defaults.",
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_and_check(cls, data: Any) -> Any:
        """Read the flat form, resolve the name and validate params against its signature."""
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
            return data  # not ours to explain: field validation reports the type error
        name: str = data["name"]
        params = data.get("params", {})
        if not isinstance(params, Mapping):
            return data
        flat = {k: v for k, v in data.items() if k not in _FIELDS}
        twice = sorted(set(flat) & set(params))
        if twice:
            raise ValueError(f"{', '.join(twice)} given both flat and in params")
        try:
            strategy = REGISTRY.resolve(name)
        except UnknownStrategy as exc:
            raise ValueError(
                f"name: Input should be {quoted_choices(exc.known)}, {REFERENCE_HELP} "
                f"(got {name!r})"
            ) from None
        except ConfigError as exc:
            raise ValueError(f"name: {exc}") from None
        try:
            model = validate_params(strategy, {**params, **flat}, label=name)
        except InvalidParams as exc:
            raise ValueError("; ".join(exc.problems)) from None
        # Stored as JSON (what the user set, validated and coerced), so the config
        # serialises as given and defaults are applied by the strategy itself.
        given = model.model_dump(mode="json", include=model.model_fields_set)
        return {"name": name, "params": given}

    def strategy_class(self) -> type[Strategy]:
        """The Strategy subclass ``name`` designates."""
        return REGISTRY.resolve(self.name)

    def build(self) -> Strategy:
        """The strategy object this config describes."""
        return self.strategy_class()(**self.params)


def _describe(exc: pydantic.ValidationError) -> str:
    problems = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["loc"]:
            where = ".".join(str(p) for p in err["loc"])
            problems.append(f"{where}: {msg} (got {err['input']!r})")
        else:
            problems.append(msg)
    return "; ".join(problems)


def make_strategy(name: str, **params: object) -> Strategy:
    """Build a strategy by name, e.g. ``make_strategy("fedadam", server_lr=0.03)``.

    ``name`` may also be a ``module:ATTR`` or ``path/to/file.py:ATTR`` reference.

    Raises
    ------
    ConfigError
        If the name is unknown, a value is out of range, or a parameter is not
        used by that strategy; the message lists every problem.
    """
    try:
        config = StrategyConfig.model_validate({"name": name, "params": params})
    except pydantic.ValidationError as exc:
        raise ConfigError(f"invalid strategy config for {name!r}: {_describe(exc)}") from None
    return config.build()
