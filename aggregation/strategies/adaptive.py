"""FedAdam and FedYogi: adaptive server optimisers of Reddi et al. 2021.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar and McMahan,
"Adaptive Federated Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295,
Algorithm 2. The mean update plays the role of a (negated) pseudo-gradient::

    m      = beta1 * m + (1 - beta1) * update
    v      = beta2 * v + (1 - beta2) * update**2                   (FedAdam)
    v      = v - (1 - beta2) * update**2 * sign(v - update**2)     (FedYogi)
    global = global + eta * m / (sqrt(v) + tau)

As in the paper there is no bias correction, ``m`` starts at 0 and ``v`` at
``tau**2`` (the paper requires ``v_{-1} >= tau**2``). ``tau`` bounds the step of
coordinates whose updates are tiny: the paper finds small values around 1e-3
work across tasks, and tunes ``eta`` per task on a log grid.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import numpy as np

from aggregation.strategies.base import Strategy
from aggregation.strategies.params import Decay, Positive
from aggregation.strategies.registry import register_strategy


class AdaptiveStrategy(Strategy):
    """Shared first moment and step of FedAdam and FedYogi; subclasses define ``v``.

    Parameters
    ----------
    server_lr
        Server learning rate ``eta`` (default: 0.01).
    beta1
        First-moment decay in [0, 1) (default: 0.9, as in the paper).
    beta2
        Second-moment decay in [0, 1) (default: 0.99, as in the paper).
    tau
        Adaptivity (numerical floor of the denominator), > 0 (default: 1e-3).
    """

    slots = ("m", "v")

    def __init__(
        self,
        *,
        server_lr: Positive = 1e-2,
        beta1: Decay = 0.9,
        beta2: Decay = 0.99,
        tau: Positive = 1e-3,
    ) -> None:
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    def initial_slot_value(self, slot: str) -> float:
        return self.tau**2 if slot == "v" else 0.0

    @abstractmethod
    def second_moment(self, v: np.ndarray, update_sq: np.ndarray) -> np.ndarray:
        """New ``v`` from the old one and ``update**2`` (both float64, may be overwritten)."""

    def step(
        self, param: np.ndarray, update: np.ndarray, state: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        m = state["m"]
        m *= self.beta1
        m += (1.0 - self.beta1) * update
        v = self.second_moment(state["v"], np.square(update))
        denom = np.sqrt(v)
        denom += self.tau
        param += self.server_lr * m / denom
        return param, {"m": m, "v": v}


@register_strategy
class FedAdam(AdaptiveStrategy):
    """Adam on the server (Reddi et al. 2021, https://arxiv.org/abs/2003.00295)."""

    name = "fedadam"

    def second_moment(self, v: np.ndarray, update_sq: np.ndarray) -> np.ndarray:
        v *= self.beta2
        v += (1.0 - self.beta2) * update_sq
        return v


@register_strategy
class FedYogi(AdaptiveStrategy):
    """Yogi on the server (Reddi et al. 2021, https://arxiv.org/abs/2003.00295).

    Yogi (Zaheer et al. 2018) changes ``v`` additively, by at most
    ``(1 - beta2) * update**2`` per round, so one round of unusually large
    updates cannot inflate the denominator the way Adam's multiplicative decay
    lets it; Reddi et al. find it the most robust of the adaptive servers.
    """

    name = "fedyogi"

    def second_moment(self, v: np.ndarray, update_sq: np.ndarray) -> np.ndarray:
        v -= (1.0 - self.beta2) * update_sq * np.sign(v - update_sq)
        return v
