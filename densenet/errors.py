"""The errors this project raises on purpose.

Every one derives from :class:`DenseNetError` (and from the built-in type a caller would expect:
``ValueError``, ``TypeError`` or ``FileNotFoundError``), so that ``densenet`` on the command line can
print them as one line and treat anything else as a bug.
"""
from __future__ import annotations

__all__ = ["ArgumentError", "ArgumentTypeError", "DenseNetError", "MissingDependency", "MissingFile", "check_int"]


class DenseNetError(Exception):
    """Base of the project's own errors: bad input, bad files, a configuration that cannot run.
    The message names what is wrong and how to fix it."""


class ArgumentError(DenseNetError, ValueError):
    """An argument with a value outside what is allowed."""


class ArgumentTypeError(DenseNetError, TypeError):
    """An argument of the wrong type."""


class MissingFile(DenseNetError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class MissingDependency(DenseNetError, ImportError):
    """An optional package a feature needs is not installed; the message says which extra installs it."""


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; else ArgumentTypeError /
    ArgumentError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer" if minimum == 0 else f"at least {minimum}"
        raise ArgumentError(f"{name} must be {kind}, got {value}")
    return value
