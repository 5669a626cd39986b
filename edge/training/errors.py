"""Errors of export and on-device training, under Canopy's one hierarchy."""

from __future__ import annotations

from infra.errors import CanopyError, ValidationError


class ExportError(CanopyError):
    """A model cannot become a working ExecuTorch training program; the message says why."""


class ParityError(ExportError):
    """The exported program trains differently from eager PyTorch beyond the tolerance."""


class ProgramError(ValidationError):
    """Bytes offered as a training program are not a loadable, matching program."""


class TrainingError(CanopyError):
    """Local training could not run or produced unusable numbers (NaN loss...)."""
