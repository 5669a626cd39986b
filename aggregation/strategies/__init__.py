"""Server strategies: turn the round's mean update into the next global model.

``make_strategy(name, **params)`` and ``StrategyConfig`` are the entry points;
see ``base.Strategy`` for the interface, ``registry`` for names and references
(``module:ATTR``) and ``docs/aggregation.md`` for the papers.
"""

# The FedAvg family is imported first so that it registers first: error messages
# list the registered names in registration order, simplest strategy first.
from aggregation.strategies.fedavg import FedAvg, FedAvgM

# isort: split
from aggregation.strategies.adaptive import AdaptiveStrategy, FedAdam, FedYogi
from aggregation.strategies.base import ClientHyperparams, Strategy, round_hyperparams
from aggregation.strategies.config import StrategyConfig, make_strategy
from aggregation.strategies.params import Decay, Positive
from aggregation.strategies.registry import (
    REGISTRY,
    StrategyRegistry,
    UnknownStrategy,
    register_strategy,
)

__all__ = [
    "REGISTRY",
    "AdaptiveStrategy",
    "ClientHyperparams",
    "Decay",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "Positive",
    "Strategy",
    "StrategyConfig",
    "StrategyRegistry",
    "UnknownStrategy",
    "make_strategy",
    "register_strategy",
    "round_hyperparams",
]
