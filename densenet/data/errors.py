"""The one error type of the data stack."""
from __future__ import annotations

__all__ = ["DataError", "DataNotFound"]


class DataError(ValueError):
    """Bad or missing input data: the message names the file and says what was expected."""


class DataNotFound(DataError):
    """The dataset's files are not where they were looked for (the message lists what was expected)."""
