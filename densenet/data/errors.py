"""The error types of the data stack."""
from __future__ import annotations

from torch import Tensor

from ..errors import DenseNetError

__all__ = ["DataError", "DataNotFound", "ExpansionRefused", "check_finite"]


class DataError(DenseNetError, ValueError):
    """Bad or missing input data: the message names the file and says what was expected."""


class DataNotFound(DataError):
    """The dataset's files are not where they were looked for (the message lists what was expected)."""


class ExpansionRefused(DataError):
    """Compressed content that would expand beyond the allowed ratio (a decompression bomb)."""


def check_finite(x: Tensor, what: str) -> None:
    """:class:`DataError` naming ``what`` if ``x`` holds NaN or infinite values (a model would turn
    them into meaningless scores)."""
    if x.is_floating_point() and not bool(x.isfinite().all()):
        bad = int((~x.isfinite()).sum())
        raise DataError(f"{what} holds {bad} NaN or infinite value(s); refusing to score it")
