"""Atomic file writes: a reader sees the old file or the new one, never a part of one."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "temp_prefix"]


def temp_prefix(path: str | os.PathLike) -> str:
    """Name prefix of the temporary files :func:`atomic_open` creates next to ``path``."""
    return f".{Path(path).name}."


@contextmanager
def atomic_open(path: str | os.PathLike, before_replace: Callable[[], None] | None = None) -> Iterator[BinaryIO]:
    """Binary file to write ``path`` through: a temporary file in the same folder, fsynced and
    renamed over ``path`` when the block ends without error (removed otherwise); then the folder
    is fsynced so that the rename itself survives a crash.

    ``before_replace`` runs after the new content is safely on disk, just before the rename (e.g.
    to keep the file being replaced under another name).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened for fsync (some file systems)
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())
