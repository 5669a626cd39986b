"""The one exception hierarchy of Canopy.

Kept free of I/O imports so the pure packages (``aggregation``) can raise these
too. Messages say what was expected, what was found and what happens next.
"""

from __future__ import annotations


class CanopyError(Exception):
    """Base of every error Canopy raises on purpose."""


class ConfigError(CanopyError, ValueError):
    """A setting, parameter or job definition is invalid."""


class StoreError(CanopyError):
    """An object store operation failed."""


class ObjectNotFoundError(StoreError, KeyError):
    """The requested object does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "object not found"


class IntegrityError(StoreError):
    """An object's bytes do not match the sha256 recorded for them."""


class ValidationError(CanopyError, ValueError):
    """Input from a device, S3 or a user failed a check (shape, dtype, finiteness...)."""
