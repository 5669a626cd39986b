"""Strategies by name: the built-ins register themselves, users add theirs or reference them.

A run names its strategy in one of two ways:

* a **registered name** (``"fedavg"``): the built-ins register at import with
  :func:`register_strategy` used as a class decorator, and a plugin package can do
  the same for its own classes;
* a **reference** to a :class:`~aggregation.strategies.base.Strategy` subclass,
  ``package.module:ATTR`` or ``path/to/file.py:ATTR``, imported on demand, so a
  user's strategy never means editing Canopy (nor registering anything).

Unknown names raise :class:`UnknownStrategy`, which lists the registered ones.
"""

from __future__ import annotations

import re
from typing import TypeVar

from aggregation.strategies.base import Strategy
from aggregation.strategies.loader import is_reference, load_reference
from infra.errors import ConfigError

S = TypeVar("S", bound=type[Strategy])

NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
"""Registered names: no colon or slash, so they can never be mistaken for references."""

REFERENCE_HELP = "or a Strategy subclass given as package.module:ATTR or path/to/file.py:ATTR"


def quoted_choices(names: list[str]) -> str:
    """``'a', 'b' or 'c'``: how pydantic lists a closed set, kept for familiar messages."""
    quoted = [repr(n) for n in names]
    if len(quoted) <= 1:
        return "".join(quoted) or "(none registered)"
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}"


class UnknownStrategy(ConfigError):
    """A strategy name that is neither registered nor a reference."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"unknown strategy {name!r}: expected {quoted_choices(known)} {REFERENCE_HELP}"
        )
        self.name = name
        self.known = known


class StrategyRegistry:
    """Strategy classes keyed by name, in registration order (the order messages list them)."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Strategy]] = {}

    def register(self, cls: S) -> S:
        """Register ``cls`` under ``cls.name``; usable as a class decorator.

        Registering the same class twice is a no-op (a module imported again);
        another class under a taken name is a ``ConfigError``.
        """
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ConfigError(f"only Strategy subclasses can be registered, got {cls!r}")
        if getattr(cls, "__abstractmethods__", None):
            raise ConfigError(f"{cls.__qualname__} is abstract and cannot be registered")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ConfigError(
                f"{cls.__qualname__}.name must match {NAME_PATTERN.pattern} "
                f"(no ':' or '/', which mark references), got {name!r}"
            )
        taken = self._classes.get(name)
        if taken is not None and taken is not cls:
            raise ConfigError(
                f"strategy name {name!r} is already registered by "
                f"{taken.__module__}.{taken.__qualname__}"
            )
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a plugin being unloaded, or a test cleaning up)."""
        self._classes.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def resolve(self, name_or_reference: str) -> type[Strategy]:
        """The class for a registered name or a ``module:ATTR`` / ``file.py:ATTR`` reference."""
        cls = self._classes.get(name_or_reference)
        if cls is not None:
            return cls
        if not is_reference(name_or_reference):
            raise UnknownStrategy(name_or_reference, self.names())

        def complain(reason: str) -> ConfigError:
            return ConfigError(f"strategy {name_or_reference!r}: {reason}")

        value = load_reference(name_or_reference, complain, prefix="canopy_user_strategy_")
        if not (isinstance(value, type) and issubclass(value, Strategy)):
            raise complain(
                f"names a {type(value).__name__}, not a subclass of aggregation.strategies.Strategy"
            )
        if getattr(value, "__abstractmethods__", None):
            missing = ", ".join(sorted(value.__abstractmethods__))
            raise complain(f"{value.__qualname__} is abstract (it does not implement {missing})")
        return value


REGISTRY = StrategyRegistry()
"""The process-wide registry that ``StrategyConfig`` and ``make_strategy`` use."""

register_strategy = REGISTRY.register
