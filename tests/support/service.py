"""What every server a test starts shares: ``with Server(...) as s`` starts it, leaving stops it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self


class Service(ABC):
    """A context manager over ``start()`` (which returns the started service) and ``stop()``."""

    @abstractmethod
    def start(self) -> Self:
        """Start the server and return it once it answers."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server and everything it started."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
