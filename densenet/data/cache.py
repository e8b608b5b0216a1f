"""On-disk cache of decoded datasets: one uncompressed ``.npz`` per source, memory-mapped when read.

Small datasets (CIFAR, SVHN, the CIFAR-10 JPEG zip) are decoded once into uint8 arrays shaped
(N, 3, 32, 32) and written here atomically (temporary file, fsync, ``os.replace``). The file name
carries a key made of the source files' paths, sizes and modification times, so a changed source
is imported again.
"""
from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_open
from .errors import DataError

__all__ = ["FORMAT_VERSION", "cache_dir", "cache_path", "load_arrays", "save_arrays"]

FORMAT_VERSION = 1


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$DENSENET_CACHE``, else ``~/.cache/densenet``."""
    if path is None:
        path = os.environ.get("DENSENET_CACHE") or Path.home() / ".cache" / "densenet"
    return Path(path).expanduser()


def cache_path(kind: str, sources: Iterable[str | os.PathLike], directory: str | os.PathLike | None = None) -> Path:
    """Cache file for dataset ``kind`` decoded from ``sources`` (keyed by their path, size and mtime)."""
    h = hashlib.sha256(f"{kind}|v{FORMAT_VERSION}".encode())
    for s in sorted(str(Path(s).resolve()) for s in sources):
        st = os.stat(s)
        h.update(f"|{s}|{st.st_size}|{st.st_mtime_ns}".encode())
    return cache_dir(directory) / f"{kind}-{h.hexdigest()[:16]}.npz"


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` as an uncompressed ``.npz`` at ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        np.savez(f, **arrays)
    return path


def load_arrays(path: str | os.PathLike, mmap: bool = True) -> dict[str, np.ndarray]:
    """The arrays of a cache file; numeric arrays are read-only memory maps when ``mmap``.

    A damaged cache file raises :class:`DataError` (delete it and it is rebuilt).
    """
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            for info in z.infolist():
                key = info.filename.removesuffix(".npy")
                if not mmap or info.compress_type != zipfile.ZIP_STORED:
                    with z.open(info) as m:
                        out[key] = np.lib.format.read_array(m, allow_pickle=False)
                    continue
                f.seek(info.header_offset)  # local header: 30 bytes, then name and extra field
                local = f.read(30)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                if dtype.hasobject:
                    raise ValueError(f"object array {key!r}")
                if int(np.prod(shape)) == 0:
                    out[key] = np.zeros(shape, dtype)
                    continue
                out[key] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                     order="F" if fortran else "C")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged zip or .npy header raises nearly anything (struct, tokenize, ...)
        raise DataError(f"cache file {path} is damaged ({type(e).__name__}: {e}); delete it to rebuild it") from None
    return out
