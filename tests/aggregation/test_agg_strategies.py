"""Server strategies against values computed independently, by hand or with numpy."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest

from aggregation.accumulator import Accumulator
from aggregation.guards import check_update
from aggregation.partial import PartialAggregate
from aggregation.strategies import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    Strategy,
    StrategyConfig,
    make_strategy,
)
from aggregation.tensors import TensorDict, spec_of
from infra.errors import ConfigError, ValidationError


def global_model() -> TensorDict:
    return {
        "w": np.array([[1.0, -2.0], [0.5, 0.0]], np.float32),
        "b": np.array([0.25, -0.75], np.float32),
    }


def copy_of(tensors: Mapping[str, np.ndarray]) -> TensorDict:
    return {k: v.copy() for k, v in tensors.items()}


class TestFedAvg:
    def test_lr_one_gives_the_weighted_mean_of_client_models(self) -> None:
        # Prepare: three clients' trained models; updates are client - global
        glob = global_model()
        rng = np.random.default_rng(0)
        clients = [
            {k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in glob.items()}
            for _ in range(3)
        ]
        samples = [10, 30, 60]
        total = PartialAggregate.zero()
        for client, n in zip(clients, samples, strict=True):
            update = {k: client[k] - glob[k] for k in glob}
            total = total + PartialAggregate.from_update(update, weight=n)
        mean_update, _ = total.finalize()
        strategy = make_strategy("fedavg")

        # Execute
        new_global, state = strategy.apply(glob, mean_update, strategy.init_state(glob))

        # Assert: Flower-style independent expectation
        for k in glob:
            expected = np.average(np.stack([c[k] for c in clients]), axis=0, weights=samples)
            np.testing.assert_allclose(new_global[k], expected, rtol=1e-6, atol=1e-6)
            assert new_global[k].dtype == np.float32
        assert state == {}

    def test_server_lr_scales_the_step(self) -> None:
        glob = global_model()
        update = {"w": np.full((2, 2), 2.0, np.float32), "b": np.array([1.0, -1.0], np.float32)}

        new_global, _ = FedAvg(server_lr=0.5).apply(glob, update, {})

        np.testing.assert_array_equal(new_global["w"], glob["w"] + 1.0)
        np.testing.assert_array_equal(new_global["b"], [0.75, -1.25])


class TestFedAvgM:
    def test_two_rounds_by_hand(self) -> None:
        # Prepare
        strategy = FedAvgM(server_lr=0.5, momentum=0.9)
        glob = {"x": np.array([1.0], np.float32)}
        state = strategy.init_state(glob)

        # Execute
        glob1, state = strategy.apply(glob, {"x": np.array([2.0], np.float32)}, state)
        glob2, state = strategy.apply(glob1, {"x": np.array([-1.0], np.float32)}, state)

        # Assert
        # round 1: v = 0.9*0 + 2 = 2;       x = 1 + 0.5*2 = 2
        # round 2: v = 0.9*2 - 1 = 0.8;     x = 2 + 0.5*0.8 = 2.4
        assert glob1["x"][0] == pytest.approx(2.0)
        assert glob2["x"][0] == pytest.approx(2.4, rel=1e-6)
        assert state["momentum/x"][0] == pytest.approx(0.8, rel=1e-6)

    def test_zero_momentum_is_fedavg(self) -> None:
        glob = global_model()
        update = {k: np.ones_like(v) for k, v in glob.items()}
        m = FedAvgM(server_lr=0.3, momentum=0.0)

        got, _ = m.apply(glob, update, m.init_state(glob))
        expected, _ = FedAvg(server_lr=0.3).apply(glob, update, {})

        for k in glob:
            np.testing.assert_array_equal(got[k], expected[k])


class TestAdaptive:
    def test_fedadam_first_step_by_hand(self) -> None:
        # Prepare
        eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
        strategy = FedAdam(server_lr=eta, beta1=b1, beta2=b2, tau=tau)
        glob = {"x": np.array([1.0, 1.0, 1.0], np.float32)}
        delta = np.array([0.5, -2.0, 0.0])
        state = strategy.init_state(glob)

        # Execute
        new, state = strategy.apply(glob, {"x": delta.astype(np.float32)}, state)

        # Assert: Reddi et al. Algorithm 2, v_{-1} = tau^2, no bias correction
        m = (1 - b1) * delta
        v = b2 * tau**2 + (1 - b2) * delta**2
        expected = 1.0 + eta * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(new["x"], expected, rtol=1e-6)
        np.testing.assert_allclose(state["m/x"], m, rtol=1e-6)
        np.testing.assert_allclose(state["v/x"], v, rtol=1e-6)
        # coordinate 0 by hand: m = 0.05, v = 0.99e-6 + 0.0025 = 0.00250099
        assert new["x"][0] == pytest.approx(
            1 + 0.1 * 0.05 / (math.sqrt(0.00250099) + 1e-3), rel=1e-6
        )
        assert new["x"][2] == 1.0

    def test_fedyogi_second_moment_moves_additively(self) -> None:
        # Prepare
        b2, tau = 0.99, 1e-3
        strategy = FedYogi(server_lr=0.1, beta1=0.9, beta2=b2, tau=tau)
        glob = {"x": np.array([0.0, 0.0], np.float32)}
        # float32-representable values, and no coordinate with v == d^2 (sign(0) is a tie)
        deltas = [np.array([1.0, 0.125]), np.array([0.0078125, 0.0625])]
        state = strategy.init_state(glob)

        # Execute
        for delta in deltas:
            glob, state = strategy.apply(glob, {"x": delta.astype(np.float32)}, state)

        # Assert: v -= (1-b2) d^2 sign(v - d^2), computed independently in float64
        v, m, x = np.full(2, tau**2), np.zeros(2), np.zeros(2)
        for d in deltas:
            m = 0.9 * m + 0.1 * d
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
            x = x + 0.1 * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(state["v/x"], v, rtol=1e-6)
        np.testing.assert_allclose(glob["x"], x, rtol=1e-5)
        # Yogi's v grew by (1 - b2) * 1.0 in round 1 and shrank only a little in round 2
        assert state["v/x"][0] == pytest.approx(tau**2 + 0.01 * 1.0 - 0.01 * 0.0078125**2, rel=1e-6)

    def test_adam_and_yogi_differ_once_v_exceeds_update_squared(self) -> None:
        glob = {"x": np.array([0.0], np.float32)}
        adam, yogi = FedAdam(server_lr=0.1), FedYogi(server_lr=0.1)
        sa, sy = adam.init_state(glob), yogi.init_state(glob)
        ga, gy = glob, glob
        for d in (1.0, 0.01):
            ga, sa = adam.apply(ga, {"x": np.array([d], np.float32)}, sa)
            gy, sy = yogi.apply(gy, {"x": np.array([d], np.float32)}, sy)

        assert sy["v/x"][0] > sa["v/x"][0]  # Yogi decays v less after a big update


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_apply_is_pure_and_keeps_dtypes(name: str) -> None:
    # Prepare
    strategy = make_strategy(name)
    glob = {**global_model(), "bn.num_batches_tracked": np.array(7, np.int64)}
    update = {
        "w": np.full((2, 2), 0.1, np.float32),
        "b": np.array([0.2, -0.2], np.float32),
        "bn.num_batches_tracked": np.array(3, np.int64),
    }
    state = strategy.init_state(glob)
    before = (copy_of(glob), copy_of(update), copy_of(state))

    # Execute
    new_global, new_state = strategy.apply(glob, update, state)

    # Assert
    for original, kept in zip((glob, update, state), before, strict=True):
        assert original.keys() == kept.keys()
        for k in original:
            np.testing.assert_array_equal(original[k], kept[k])
    assert {k: v.dtype for k, v in new_global.items()} == {k: v.dtype for k, v in glob.items()}
    assert int(new_global["bn.num_batches_tracked"]) == 10  # integers: plain add, no optimiser
    assert not any("num_batches_tracked" in k for k in new_state)
    assert new_state.keys() == state.keys()


def test_mismatched_update_or_state_is_refused() -> None:
    glob = global_model()
    adam = FedAdam()
    state = adam.init_state(glob)

    with pytest.raises(ValidationError, match=r"missing: \['b'\]"):
        adam.apply(glob, {"w": np.zeros((2, 2), np.float32)}, state)
    with pytest.raises(ValidationError, match="has shape"):
        adam.apply(glob, {"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}, state)
    with pytest.raises(ValidationError, match="written by another strategy"):
        adam.apply(glob, {k: np.zeros_like(v) for k, v in glob.items()}, FedAvgM().init_state(glob))


class TestConfig:
    def test_defaults_per_strategy(self) -> None:
        assert make_strategy("fedavg").params() == {"server_lr": 1.0}
        assert make_strategy("fedavgm").params() == {"server_lr": 1.0, "momentum": 0.9}
        assert make_strategy("fedyogi").params() == {
            "server_lr": 0.01,
            "beta1": 0.9,
            "beta2": 0.99,
            "tau": 1e-3,
        }

    def test_params_are_passed_through(self) -> None:
        strategy = make_strategy("fedadam", server_lr=0.03, beta1=0.8, beta2=0.95, tau=1e-4)

        assert isinstance(strategy, FedAdam)
        assert strategy.params() == {"server_lr": 0.03, "beta1": 0.8, "beta2": 0.95, "tau": 1e-4}
        assert StrategyConfig(name="fedadam", server_lr=0.03).build().params()["server_lr"] == 0.03

    @pytest.mark.parametrize(
        ("name", "params", "message"),
        [
            ("fedsgd", {}, "name: Input should be 'fedavg', 'fedavgm', 'fedadam' or 'fedyogi'"),
            ("fedavg", {"server_lr": 0.0}, "server_lr: Input should be greater than 0"),
            ("fedavg", {"server_lr": math.nan}, "server_lr: Input should be a finite number"),
            ("fedavgm", {"momentum": 1.0}, "momentum: Input should be less than 1"),
            ("fedadam", {"tau": -1.0}, "tau: Input should be greater than 0"),
            ("fedadam", {"beta2": 1.5, "beta1": -0.1}, "beta1: .*; beta2: "),
            ("fedavg", {"momentum": 0.5}, "fedavg does not use momentum"),
            ("fedadam", {"momentum": 0.5}, "fedadam does not use momentum"),
            ("fedavg", {"lr": 0.1}, "lr: Extra inputs are not permitted"),
        ],
    )
    def test_bad_config_is_a_clear_config_error(
        self, name: str, params: dict[str, object], message: str
    ) -> None:
        with pytest.raises(ConfigError, match=message):
            make_strategy(name, **params)

    def test_direct_construction_also_validates(self) -> None:
        with pytest.raises(ConfigError, match="momentum"):
            FedAvgM(momentum=1.5)
        with pytest.raises(ConfigError, match="server_lr"):
            FedAvg(server_lr=-1.0)
        with pytest.raises(ConfigError, match="tau"):
            FedYogi(tau=0.0)


class SignSGD(Strategy):
    """Toy strategy: step every coordinate by ``lr`` in the direction of the mean update,
    with a step counter as server state. It only implements ``step``."""

    name = "signsgd"
    slots = ("steps",)

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step(
        self, param: np.ndarray, update: np.ndarray, state: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return param + self.lr * np.sign(update), {"steps": state["steps"] + 1}


def test_toy_strategy_runs_a_whole_tree_round() -> None:
    """The abstractions compose: guard -> accumulate per leaf -> add partials -> finalise ->
    a user-defined strategy, over two rounds with server state carried between them."""
    # Prepare
    strategy = SignSGD(lr=0.5)
    glob = global_model()
    spec = spec_of(glob)
    state = strategy.init_state(glob)
    rng = np.random.default_rng(7)

    for _ in range(2):
        leaves = []
        for _leaf in range(3):
            acc = Accumulator(spec)
            for device in range(4):
                update = {
                    k: rng.standard_normal(v.shape).astype(np.float32) + 1 for k, v in glob.items()
                }
                checked = check_update(
                    update,
                    spec=spec,
                    device_id=f"dev-{device}",
                    weight=device + 1,
                    metrics={"loss": 1.0},
                )
                acc.add_checked(checked)
            leaves.append(PartialAggregate.from_bytes(acc.result().to_bytes()))
        root = leaves[0] + (leaves[1] + leaves[2])

        # Execute
        mean_update, metrics = root.finalize()
        new_glob, state = strategy.apply(glob, mean_update, state)

        # Assert
        assert root.count == 12 and root.weight == 3 * (1 + 2 + 3 + 4)
        assert metrics == {"loss": pytest.approx(1.0)}
        for k in glob:
            np.testing.assert_allclose(new_glob[k], glob[k] + 0.5 * np.sign(mean_update[k]))
        glob = new_glob
    np.testing.assert_array_equal(state["steps/w"], np.full((2, 2), 2.0))
