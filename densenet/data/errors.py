"""The one error type of the data stack."""
from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or missing input data: the message names the file and says what was expected."""
