"""Server strategies: turn the round's mean update into the next global model.

``make_strategy(name, **params)`` is the entry point; see ``base.Strategy`` for
the interface and ``docs/aggregation.md`` for the papers.
"""

from aggregation.strategies.adaptive import AdaptiveStrategy, FedAdam, FedYogi
from aggregation.strategies.base import Strategy
from aggregation.strategies.config import StrategyConfig, StrategyName, make_strategy
from aggregation.strategies.fedavg import FedAvg, FedAvgM

__all__ = [
    "AdaptiveStrategy",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "Strategy",
    "StrategyConfig",
    "StrategyName",
    "make_strategy",
]
