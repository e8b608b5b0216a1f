"""A small, bounds-checked reader of MATLAB 5 ``.mat`` files: numeric matrices only.

SVHN ships as MATLAB 5 files. ``scipy.io.loadmat`` crashes the interpreter (a segmentation fault)
on some damaged files, e.g. one whose data type code was altered, so they are parsed here in pure
Python: every length is checked against what is there, only real numeric matrices are converted,
and compressed variables are inflated under the archive expansion limit. Everything else raises
:class:`DataError` naming the file.

Format (MathWorks, "MAT-File Format"): a 128-byte header (text, subsystem offset, version 0x0100,
endian indicator ``IM``/``MI``), then data elements, each an 8-byte tag (type, byte count) or a
"small" 4-byte tag with up to 4 bytes of data, padded to 8 bytes. A variable is a ``miMATRIX``
element (possibly inside a zlib ``miCOMPRESSED`` element) holding array flags, dimensions, name and
the real part, stored column-major and possibly in a narrower type than its class.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .archive import check_expansion
from .errors import DataError, DataNotFound

__all__ = ["read_mat_arrays"]

_STORAGE = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}  # miINT8, ...
_CLASSES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}  # mxDOUBLE...
_MATRIX, _COMPRESSED, _INT8, _INT32, _UINT32 = 14, 15, 1, 5, 6
_COMPLEX = 0x0800


def _element(buf: bytes | memoryview, pos: int, order: str, where: str) -> tuple[int, memoryview, int]:
    """(type, data, position after the padded element) of the element at ``pos`` of ``buf``."""
    if pos + 8 > len(buf):
        raise DataError(f"{where}: truncated (an element tag runs past the end)")
    mdtype, nbytes = struct.unpack_from(order + "II", buf, pos)
    if mdtype >> 16:  # small element: byte count in the upper half, data in the tag's second word
        nbytes, mdtype = mdtype >> 16, mdtype & 0xFFFF
        if nbytes > 4:
            raise DataError(f"{where}: corrupt small element ({nbytes} bytes)")
        return mdtype, memoryview(buf)[pos + 4:pos + 4 + nbytes], pos + 8
    end = pos + 8 + nbytes
    if end > len(buf):
        raise DataError(f"{where}: truncated (an element of {nbytes:,} bytes runs past the end)")
    return mdtype, memoryview(buf)[pos + 8:end], end + (-nbytes % 8 if mdtype != _COMPRESSED else 0)


def _numbers(mdtype: int, data: memoryview, order: str, where: str, what: str) -> np.ndarray:
    if mdtype not in _STORAGE:
        raise DataError(f"{where}: {what} has data type code {mdtype}, not a numeric MATLAB type")
    dtype = np.dtype(order + _STORAGE[mdtype])
    if len(data) % dtype.itemsize:
        raise DataError(f"{where}: {what} holds {len(data)} bytes, not a whole number of {dtype} values")
    return np.frombuffer(data, dtype)


def _matrix(body: memoryview, order: str, where: str) -> tuple[str, np.ndarray | None]:
    """(name, array) of a miMATRIX element's content; array None for non-numeric classes."""
    mdtype, flags, pos = _element(body, 0, order, where)
    if mdtype != _UINT32 or len(flags) < 4:
        raise DataError(f"{where}: corrupt variable (array flags missing)")
    word = struct.unpack_from(order + "I", flags)[0]
    mdtype, dims, pos = _element(body, pos, order, where)
    if mdtype != _INT32:
        raise DataError(f"{where}: corrupt variable (dimensions missing)")
    shape = tuple(int(d) for d in _numbers(mdtype, dims, order, where, "the dimensions"))
    mdtype, raw_name, pos = _element(body, pos, order, where)
    if mdtype != _INT8:
        raise DataError(f"{where}: corrupt variable (name missing)")
    name = bytes(raw_name).decode("latin-1")
    klass = word & 0xFF
    if klass not in _CLASSES or word & _COMPLEX:
        return name, None  # cells, structs, strings, sparse or complex: not what SVHN holds
    if any(d < 0 for d in shape) or len(shape) < 2:
        raise DataError(f"{where}: variable {name!r} has impossible dimensions {shape}")
    mdtype, real, pos = _element(body, pos, order, where)
    values = _numbers(mdtype, real, order, where, f"variable {name!r}")
    if values.size != int(np.prod(shape, dtype=np.float64)):
        raise DataError(f"{where}: variable {name!r} holds {values.size:,} values for dimensions {shape}")
    return name, values.astype(np.dtype(_CLASSES[klass]).newbyteorder("="), copy=False).reshape(shape, order="F")


def _inflate(raw: memoryview, path: Path, order: str) -> bytes:
    """The element inside a miCOMPRESSED element, inflated no further than its own tag says."""
    try:
        inflater = zlib.decompressobj()
        head = inflater.decompress(raw, 8)
        if len(head) < 8:
            raise DataError(f"{path}: truncated compressed variable")
        _, nbytes = struct.unpack(order + "II", head)
        check_expansion(path, "a compressed variable", 8 + nbytes, len(raw))
        body = head + inflater.decompress(inflater.unconsumed_tail, nbytes)
    except zlib.error as e:
        raise DataError(f"{path}: corrupt compressed variable ({e})") from None
    if len(body) < 8 + nbytes:
        raise DataError(f"{path}: truncated compressed variable ({len(body) - 8:,} of {nbytes:,} bytes)")
    return body


def read_mat_arrays(path: str | os.PathLike, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The numeric matrices called ``names`` in MATLAB 5 file ``path`` (those present), native byte order."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataNotFound(f"{path}: file missing") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if data.startswith(b"MATLAB 7.3"):
        raise DataError(f"{path}: a MATLAB 7.3 (HDF5) file; save it in MATLAB 5 format (save -v7)")
    if len(data) < 128 or not data.startswith(b"MATLAB 5.0 MAT-file") or data[126:128] not in (b"IM", b"MI"):
        raise DataError(f"{path}: not a MATLAB 5 .mat file (no 'MATLAB 5.0 MAT-file' header)")
    order = "<" if data[126:128] == b"IM" else ">"
    found: dict[str, np.ndarray] = {}
    pos = 128
    while pos + 8 <= len(data) and len(found) < len(names):
        mdtype, content, pos = _element(data, pos, order, str(path))
        if mdtype == _COMPRESSED:
            mdtype, content, _ = _element(_inflate(content, path, order), 0, order, str(path))
        if mdtype != _MATRIX:
            continue
        name, array = _matrix(content, order, str(path))
        if name in names and array is not None:
            found[name] = array
    return found
