"""Domain errors. Each message says what failed, where, what was expected, and how to fix it.

The CLI maps ``UsageError`` subclasses to exit code 2 and ``StageError`` to exit code 1.
"""

from __future__ import annotations


class InflucoderError(Exception):
    """Base class of every error this package raises on purpose."""


class UsageError(InflucoderError):
    """The user's input (config, paths, data) is wrong; exit code 2."""


class ConfigError(UsageError, ValueError):
    """A job config field is missing, mistyped or out of range."""


class InputDataError(UsageError, ValueError):
    """An input file is unreadable, a column is missing, or too many rows are bad."""


class ArtifactMissingError(UsageError, FileNotFoundError):
    """An upstream stage has not produced its artifact yet."""


class ArtifactMismatchError(UsageError):
    """A finished stage was produced from a different config or different upstream artifacts."""


class ResourceError(UsageError):
    """The job asks for resources (GPUs, CPUs) that the Ray cluster does not have."""


class StageError(InflucoderError):
    """A stage failed while running (worker crash, numerical failure); exit code 1."""
