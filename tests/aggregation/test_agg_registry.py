"""Open strategies: the registry, module:ATTR references, signature-derived params, and
the ``configure_round`` hook."""

from __future__ import annotations

import inspect
import json
import math
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregation.strategies import (
    REGISTRY,
    ClientHyperparams,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    Positive,
    Strategy,
    StrategyConfig,
    StrategyRegistry,
    UnknownStrategy,
    make_strategy,
    register_strategy,
    round_hyperparams,
)
from infra.errors import ConfigError, ValidationError

JOB_DEFAULTS: dict[str, Any] = {
    "lr": 0.05,
    "local_epochs": 1,
    "batch_size": 16,
    "momentum": 0.0,
    "max_steps": None,
}


class DecayingLr(Strategy):
    """FedAvg on the server; the devices' learning rate decays geometrically per round."""

    name = "decaying-lr"

    def __init__(self, *, server_lr: Positive = 1.0, decay: Positive = 0.5) -> None:
        self.server_lr = server_lr
        self.decay = decay

    def step(
        self, param: np.ndarray, update: np.ndarray, state: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return param + self.server_lr * update, {}

    def configure_round(self, rnd: int, hyperparams: Mapping[str, Any]) -> ClientHyperparams:
        return {**hyperparams, "lr": hyperparams["lr"] * self.decay**rnd}


@pytest.fixture
def registered_decaying_lr() -> Iterator[type[DecayingLr]]:
    REGISTRY.register(DecayingLr)
    yield DecayingLr
    REGISTRY.unregister(DecayingLr.name)


USER_FILE = '''
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from aggregation.strategies import Strategy


class ScaledAvg(Strategy):
    """A user's strategy, in the user's own file."""

    name = "scaled-avg"

    def __init__(self, *, scale: Annotated[float, Field(gt=0, le=2)] = 0.5,
                 warm_rounds: int = 2) -> None:
        self.scale = scale
        self.warm_rounds = warm_rounds

    def step(self, param, update, state):
        return param + self.scale * update, {}

    def configure_round(self, rnd: int, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
        return {"local_epochs": 1 if rnd < self.warm_rounds else 3}


NOT_A_STRATEGY = 42
'''


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_strategies.py"
    path.write_text(USER_FILE)
    return path


class TestRegistry:
    def test_builtins_register_themselves_in_order(self) -> None:
        assert REGISTRY.names()[:4] == ["fedavg", "fedavgm", "fedadam", "fedyogi"]
        assert [REGISTRY.resolve(n) for n in ("fedavg", "fedavgm", "fedadam", "fedyogi")] == [
            FedAvg,
            FedAvgM,
            FedAdam,
            FedYogi,
        ]

    def test_a_registered_strategy_is_usable_by_name(
        self, registered_decaying_lr: type[DecayingLr]
    ) -> None:
        # Execute
        strategy = StrategyConfig(name="decaying-lr", params={"decay": 0.9}).build()

        # Assert
        assert isinstance(strategy, registered_decaying_lr)
        assert strategy.params() == {"server_lr": 1.0, "decay": 0.9}
        assert "decaying-lr" in REGISTRY.names()

    def test_unknown_name_lists_the_registered_ones(self) -> None:
        with pytest.raises(UnknownStrategy) as info:
            REGISTRY.resolve("fedprox")

        assert info.value.known[:4] == ["fedavg", "fedavgm", "fedadam", "fedyogi"]
        assert "'fedavg', 'fedavgm', 'fedadam' or 'fedyogi'" in str(info.value)
        assert "package.module:ATTR" in str(info.value)

    def test_registering_is_idempotent_for_the_same_class_only(self) -> None:
        registry = StrategyRegistry()
        registry.register(DecayingLr)
        registry.register(DecayingLr)

        class Impostor(DecayingLr):
            name = "decaying-lr"

        with pytest.raises(ConfigError, match=r"already registered by .*DecayingLr"):
            registry.register(Impostor)
        assert registry.names() == ["decaying-lr"]
        registry.unregister("decaying-lr")
        assert "decaying-lr" not in registry

    @pytest.mark.parametrize("bad_name", ["", "my:strategy", "a/b", "9lives"])
    def test_names_that_look_like_references_are_refused(self, bad_name: str) -> None:
        class Named(DecayingLr):
            name = bad_name

        with pytest.raises(ConfigError, match="name must match"):
            StrategyRegistry().register(Named)

    def test_only_concrete_strategies_can_be_registered(self) -> None:
        class Abstract(Strategy):
            name = "abstract"

        with pytest.raises(ConfigError, match="abstract"):
            StrategyRegistry().register(Abstract)
        with pytest.raises(ConfigError, match="only Strategy subclasses"):
            StrategyRegistry().register(int)  # type: ignore[type-var]

    def test_register_works_as_a_decorator(self) -> None:
        registry = StrategyRegistry()

        @registry.register
        class Tiny(DecayingLr):
            name = "tiny"

        assert registry.resolve("tiny") is Tiny
        assert register_strategy.__self__ is REGISTRY  # type: ignore[attr-defined]


class TestReferences:
    def test_file_reference_loads_the_users_class(self, user_file: Path) -> None:
        # Prepare
        ref = f"{user_file}:ScaledAvg"

        # Execute
        config = StrategyConfig(name=ref, params={"scale": 0.25})
        strategy = config.build()

        # Assert
        assert type(strategy).__name__ == "ScaledAvg"
        assert strategy.params() == {"scale": 0.25, "warm_rounds": 2}
        glob = {"x": np.array([1.0], np.float32)}
        new, _ = strategy.apply(glob, {"x": np.array([2.0], np.float32)}, {})
        assert new["x"][0] == pytest.approx(1.5)
        # a second lookup reuses the imported module instead of running the file again
        assert config.strategy_class() is type(strategy)

    def test_module_reference(self, user_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.syspath_prepend(str(user_file.parent))
        monkeypatch.delitem(sys.modules, "my_strategies", raising=False)

        strategy = make_strategy("my_strategies:ScaledAvg", warm_rounds=1)

        assert strategy.params() == {"scale": 0.5, "warm_rounds": 1}

    def test_user_params_are_validated_by_their_annotations(self, user_file: Path) -> None:
        with pytest.raises(ConfigError) as info:
            make_strategy(f"{user_file}:ScaledAvg", scale=3.0, warm_rounds="x", lr=1)

        message = str(info.value)
        assert "scale: Input should be less than or equal to 2 (got 3.0)" in message
        assert "warm_rounds: Input should be a valid integer" in message
        assert "lr: Extra inputs are not permitted" in message
        assert "it takes scale, warm_rounds" in message

    @pytest.mark.parametrize(
        ("attr", "message"),
        [
            ("Missing", "has no attribute 'Missing'"),
            ("NOT_A_STRATEGY", "names a int, not a subclass of aggregation.strategies.Strategy"),
            ("Strategy", "Strategy is abstract"),
        ],
    )
    def test_bad_references_say_why(self, user_file: Path, attr: str, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            make_strategy(f"{user_file}:{attr}")

    def test_missing_file_or_module(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="does not exist"):
            make_strategy(f"{tmp_path / 'nope.py'}:X")
        with pytest.raises(ConfigError, match="module 'no_such_canopy_module' not found"):
            make_strategy("no_such_canopy_module:X")

    def test_errors_inside_the_users_module_surface_as_themselves(self, tmp_path: Path) -> None:
        path = tmp_path / "broken.py"
        path.write_text("import a_dependency_nobody_installed\n")

        with pytest.raises(ModuleNotFoundError, match="a_dependency_nobody_installed"):
            make_strategy(f"{path}:X")


class TestConfig:
    def test_flat_and_nested_forms_are_the_same_config(self) -> None:
        flat = StrategyConfig.model_validate({"name": "fedadam", "server_lr": 0.03})
        nested = StrategyConfig.model_validate({"name": "fedadam", "params": {"server_lr": 0.03}})

        assert flat == nested
        assert flat.model_dump(mode="json") == {"name": "fedadam", "params": {"server_lr": 0.03}}

    def test_config_round_trips_through_json(self) -> None:
        config = StrategyConfig(name="fedavgm", params={"momentum": 0.5})

        back = StrategyConfig.model_validate_json(config.model_dump_json())

        assert back == config
        assert back.build().params() == {"server_lr": 1.0, "momentum": 0.5}

    def test_params_keep_only_what_was_set_validated(self) -> None:
        config = StrategyConfig(name="fedavg", params={"server_lr": "0.5"})

        assert config.params == {"server_lr": 0.5}  # coerced, defaults not copied in
        assert StrategyConfig(name="fedyogi").params == {}

    def test_a_key_given_twice_is_refused(self) -> None:
        with pytest.raises(ValueError, match="server_lr given both flat and in params"):
            StrategyConfig.model_validate(
                {"name": "fedavg", "server_lr": 1.0, "params": {"server_lr": 2.0}}
            )

    def test_json_schema_is_a_name_and_params_form_that_accepts_the_flat_form(self) -> None:
        schema = StrategyConfig.model_json_schema()

        assert set(schema["properties"]) == {"name", "params"}
        assert schema["required"] == ["name"]
        assert schema.get("additionalProperties", True) is not False
        json.dumps(schema)

    def test_defaults_are_read_from_the_signature(self) -> None:
        # One place for each default: the constructor. Config and params() agree with it.
        for cls in (FedAvg, FedAvgM, FedAdam, FedYogi):
            signature = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
            assert make_strategy(cls.name).params() == signature
            assert StrategyConfig(name=cls.name).build().params() == signature

    def test_positional_arguments_are_validated_too(self) -> None:
        class Positional(DecayingLr):
            name = "positional"

            def __init__(self, lr: Positive) -> None:
                self.lr = lr

        assert Positional(0.5).params() == {"lr": 0.5}
        with pytest.raises(ConfigError, match="lr: Input should be greater than 0"):
            Positional(-1.0)
        with pytest.raises(ConfigError, match="lr: Field required"):
            Positional()  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="takes 1 positional"):
            Positional(0.5, 0.6)  # type: ignore[call-arg]

    def test_a_subclass_records_its_own_params(self) -> None:
        class Faster(FedAvgM):
            name = "faster"

            def __init__(self, *, boost: Positive = 2.0) -> None:
                super().__init__(server_lr=boost, momentum=0.5)

        strategy = Faster()

        assert strategy.params() == {"boost": 2.0}
        assert (strategy.server_lr, strategy.momentum) == (2.0, 0.5)

    def test_unnamed_hyperparameters_are_refused(self) -> None:
        class Loose(DecayingLr):
            name = "loose"

            def __init__(self, **options: float) -> None:
                self.options = options

        with pytest.raises(ConfigError, match="must be named parameters"):
            Loose(lr=1.0)


class TestConfigureRound:
    def test_default_leaves_the_jobs_hyperparameters_unchanged(self) -> None:
        for name in ("fedavg", "fedavgm", "fedadam", "fedyogi"):
            got = round_hyperparams(make_strategy(name), rnd=3, defaults=JOB_DEFAULTS)

            assert got == JOB_DEFAULTS and got is not JOB_DEFAULTS

    def test_a_strategy_decays_the_client_lr_per_round(self) -> None:
        # Prepare
        strategy = DecayingLr(decay=0.5)
        before = dict(JOB_DEFAULTS)

        # Execute
        rounds = [round_hyperparams(strategy, rnd=r, defaults=JOB_DEFAULTS) for r in range(4)]

        # Assert
        assert [h["lr"] for h in rounds] == [0.05, 0.025, 0.0125, 0.00625]
        assert all({**h, "lr": 0.05} == JOB_DEFAULTS for h in rounds)
        assert before == JOB_DEFAULTS  # pure: the caller's dict is untouched
        assert round_hyperparams(strategy, rnd=2, defaults=JOB_DEFAULTS) == rounds[2]

    def test_keys_left_out_keep_the_jobs_values(self, user_file: Path) -> None:
        strategy = make_strategy(f"{user_file}:ScaledAvg", warm_rounds=1)

        first = round_hyperparams(strategy, rnd=0, defaults=JOB_DEFAULTS)
        later = round_hyperparams(strategy, rnd=5, defaults=JOB_DEFAULTS)

        assert first == JOB_DEFAULTS
        assert later == {**JOB_DEFAULTS, "local_epochs": 3}

    def test_the_hook_cannot_mutate_the_defaults(self) -> None:
        class Mutating(DecayingLr):
            name = "mutating"

            def configure_round(
                self, rnd: int, hyperparams: Mapping[str, Any]
            ) -> ClientHyperparams:
                hyperparams["lr"] = 1.0  # type: ignore[index]
                return dict(hyperparams)

        with pytest.raises(TypeError):
            round_hyperparams(Mutating(), rnd=0, defaults=JOB_DEFAULTS)

    @pytest.mark.parametrize(
        ("answer", "message"),
        [
            ({"learning_rate": 0.1}, r"set \['learning_rate'\], which the job does not define"),
            ({"lr": math.nan}, "not finite JSON scalars"),
            ({"lr": [0.1]}, "not finite JSON scalars"),
            ([("lr", 0.1)], "returned list, not a mapping"),
        ],
    )
    def test_bad_answers_are_refused(self, answer: object, message: str) -> None:
        class Bad(DecayingLr):
            name = "bad"

            def configure_round(
                self, rnd: int, hyperparams: Mapping[str, Any]
            ) -> ClientHyperparams:
                return answer  # type: ignore[return-value]

        with pytest.raises(ValidationError, match=message):
            round_hyperparams(Bad(), rnd=0, defaults=JOB_DEFAULTS)

    @pytest.mark.parametrize("rnd", [-1, True, 1.0])
    def test_round_must_be_a_natural_number(self, rnd: object) -> None:
        with pytest.raises(ValidationError, match="round must be an int"):
            round_hyperparams(FedAvg(), rnd=rnd, defaults=JOB_DEFAULTS)  # type: ignore[arg-type]
