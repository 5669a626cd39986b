"""``StrategyConfig`` and ``make_strategy``: the validated boundary from run config to strategy.

Strategy names and hyperparameters arrive from flow parameters and job files, so
they are validated with pydantic here (and only here) and refused with a
:class:`~infra.errors.ConfigError` that lists every problem at once. A parameter
that the chosen strategy does not use (``momentum`` for FedAdam, say) is an error
rather than silently ignored: it almost always means a typo or a wrong name.
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

from aggregation.strategies.adaptive import FedAdam, FedYogi
from aggregation.strategies.base import Strategy
from aggregation.strategies.fedavg import FedAvg, FedAvgM
from infra.errors import ConfigError

StrategyName = Literal["fedavg", "fedavgm", "fedadam", "fedyogi"]

_USES: dict[str, frozenset[str]] = {
    "fedavg": frozenset({"server_lr"}),
    "fedavgm": frozenset({"server_lr", "momentum"}),
    "fedadam": frozenset({"server_lr", "beta1", "beta2", "tau"}),
    "fedyogi": frozenset({"server_lr", "beta1", "beta2", "tau"}),
}

_DEFAULT_SERVER_LR: dict[str, float] = {
    "fedavg": 1.0,
    "fedavgm": 1.0,
    "fedadam": 1e-2,
    "fedyogi": 1e-2,
}


class StrategyConfig(BaseModel):
    """Server strategy and its hyperparameters, as given in a job or flow run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrategyName = Field(description="Server strategy.")
    server_lr: float | None = Field(
        default=None,
        gt=0.0,
        allow_inf_nan=False,
        description="Server learning rate (eta). Default: 1.0 for fedavg/fedavgm, "
        "0.01 for fedadam/fedyogi (Reddi et al. tune it per task).",
    )
    momentum: float = Field(
        default=0.9, ge=0.0, lt=1.0, description="FedAvgM server momentum (Hsu et al. 2019)."
    )
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="First-moment decay.")
    beta2: float = Field(default=0.99, ge=0.0, lt=1.0, description="Second-moment decay.")
    tau: float = Field(
        default=1e-3, gt=0.0, allow_inf_nan=False, description="Adaptivity / denominator floor."
    )

    @model_validator(mode="after")
    def _only_used_parameters(self) -> StrategyConfig:
        unused = sorted(self.model_fields_set - _USES[self.name] - {"name"})
        if unused:
            raise ValueError(
                f"{self.name} does not use {', '.join(unused)} "
                f"(it takes {', '.join(sorted(_USES[self.name]))})"
            )
        return self

    @property
    def effective_server_lr(self) -> float:
        return self.server_lr if self.server_lr is not None else _DEFAULT_SERVER_LR[self.name]

    def build(self) -> Strategy:
        """The strategy object this config describes."""
        lr = self.effective_server_lr
        if self.name == "fedavg":
            return FedAvg(server_lr=lr)
        if self.name == "fedavgm":
            return FedAvgM(server_lr=lr, momentum=self.momentum)
        adaptive = FedAdam if self.name == "fedadam" else FedYogi
        return adaptive(server_lr=lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau)


def make_strategy(name: str, **params: object) -> Strategy:
    """Build a strategy by name, e.g. ``make_strategy("fedadam", server_lr=0.03)``.

    Raises
    ------
    ConfigError
        If the name is unknown, a value is out of range, or a parameter is not
        used by that strategy; the message lists every problem.
    """
    try:
        config = StrategyConfig.model_validate({"name": name, **params})
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err['input']!r})"
            if err["loc"]
            else err["msg"].removeprefix("Value error, ")
            for err in exc.errors()
        )
        raise ConfigError(f"invalid strategy config for {name!r}: {problems}") from None
    return config.build()
