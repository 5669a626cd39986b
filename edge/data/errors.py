"""Errors about datasets and partitions."""

from __future__ import annotations

from infra.errors import CanopyError, ConfigError


class DatasetUnavailableError(CanopyError):
    """The requested dataset is not where the config says; the message says how to provide it."""


class PartitionError(ConfigError):
    """A partition cannot satisfy its scheme (too many devices, too few examples...)."""
