"""A restricted unpickler for the CIFAR python release: plain data and numpy arrays only.

Nothing a pickle names is imported except numpy's array/dtype reconstructors and ``_codecs.encode``
(used by protocol-2 pickles of ``bytes``), so a crafted file cannot run code. The result is also
checked to hold only dicts, lists, tuples, bytes, strings, numbers and non-object numpy arrays.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

from .errors import DataError

__all__ = ["safe_loads"]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),
}
_PLAIN = (dict, list, tuple, bytes, bytearray, str, int, float, bool, type(None), np.ndarray, np.generic)


class _Refused(pickle.UnpicklingError):
    """Something other than plain data (as opposed to a damaged stream)."""


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise _Refused(f"refused global {module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("refused persistent id")


def _check(obj: Any, depth: int = 0) -> None:
    if depth > 50 or not isinstance(obj, _PLAIN):
        raise _Refused(f"refused object of type {type(obj).__name__}")
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.hasobject:
        raise _Refused("refused numpy array of Python objects")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check(k, depth + 1)
            _check(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check(v, depth + 1)


def safe_loads(data: bytes, name: str) -> Any:
    """Unpickle ``data`` (from file ``name``) admitting plain data only; :class:`DataError` otherwise.

    Python 2 strings come back as ``bytes`` (``encoding="bytes"``, as the official CIFAR release needs).
    """
    try:
        obj = _Restricted(io.BytesIO(data), encoding="bytes").load()
        _check(obj)
    except _Refused as e:
        raise DataError(f"{name}: refused: the pickle holds something other than plain data ({e})") from None
    except Exception as e:  # noqa: BLE001 - truncated streams raise EOFError, ValueError, KeyError, ...
        raise DataError(f"{name}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    return obj
