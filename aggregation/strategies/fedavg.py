"""FedAvg and FedAvgM: a server step along the (momentum-smoothed) mean update."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregation.strategies.base import Strategy
from aggregation.strategies.params import Decay, Positive
from aggregation.strategies.registry import register_strategy


@register_strategy
class FedAvg(Strategy):
    """Federated Averaging: ``global + server_lr * mean_update``.

    McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", https://arxiv.org/abs/1602.05629. The mean is weighted by
    sample count (that happens in ``PartialAggregate.finalize``); with
    ``server_lr=1`` the new global model is the weighted mean of the clients' models.
    A ``server_lr`` other than 1 is the "FedAvg with server learning rate" baseline
    of Reddi et al. 2021.

    Parameters
    ----------
    server_lr
        Server learning rate (default: 1.0).
    """

    name = "fedavg"

    def __init__(self, *, server_lr: Positive = 1.0) -> None:
        self.server_lr = server_lr

    def step(
        self, param: np.ndarray, update: np.ndarray, state: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        update *= self.server_lr
        param += update
        return param, {}


@register_strategy
class FedAvgM(Strategy):
    """FedAvg with server momentum.

    Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification",
    https://arxiv.org/abs/1909.06335. With our sign convention (update =
    client - global) one round is::

        v      = momentum * v + mean_update
        global = global + server_lr * v

    Momentum damps the round-to-round oscillation that non-IID cohorts cause;
    the paper pairs momentum 0.9 with a server learning rate of 1 (or lower
    when the effective step ``server_lr / (1 - momentum)`` is too large).

    Parameters
    ----------
    server_lr
        Server learning rate (default: 1.0).
    momentum
        Server momentum in [0, 1) (default: 0.9). 0 is plain FedAvg.
    """

    name = "fedavgm"
    slots = ("momentum",)

    def __init__(self, *, server_lr: Positive = 1.0, momentum: Decay = 0.9) -> None:
        self.server_lr = server_lr
        self.momentum = momentum

    def step(
        self, param: np.ndarray, update: np.ndarray, state: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        velocity = state["momentum"]
        velocity *= self.momentum
        velocity += update
        param += self.server_lr * velocity
        return param, {"momentum": velocity}
