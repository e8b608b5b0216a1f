"""SVHN cropped digits (format 2): ``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat``.

Each file is a MATLAB file with ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) labels 1..10, where 10
means the digit 0. Decoded to ``x`` (N, 3, 32, 32) uint8 and ``y`` (N,) int64 in 0..9.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import DataError, DataNotFound, ExpansionRefused
from .matfile import read_mat_arrays

__all__ = ["SVHN_FILES", "find_svhn", "read_svhn", "read_svhn_mat"]

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat file -> (images (N, 3, 32, 32) uint8, labels (N,) int64 with 10 mapped to 0)."""
    try:
        m = read_mat_arrays(path, ("X", "y"))  # not scipy.io.loadmat: it crashes on some damaged files
    except (DataNotFound, ExpansionRefused):
        raise
    except DataError as e:
        raise DataError(f"{path}: not a readable MATLAB file, truncated or corrupt "
                        f"({str(e).removeprefix(f'{path}: ')})") from None
    if "X" not in m or "y" not in m:
        raise DataError(f"{path}: expected numeric variables X (32, 32, 3, N) and y (N, 1); found "
                        f"{', '.join(m) or 'neither'}")
    x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise DataError(f"{path}: X is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
    if len(y) != x.shape[3]:
        raise DataError(f"{path}: {len(y)} labels for {x.shape[3]} images")
    y = y.astype(np.int64)
    bad = np.flatnonzero((y < 1) | (y > 10))
    if len(bad):
        raise DataError(f"{path}: label {int(y[bad[0]])} of image {int(bad[0])} is out of range 1..10 (10 means digit 0)")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % 10


def find_svhn(root: str | os.PathLike, splits: tuple[str, ...] = ("train", "extra", "test")) -> dict[str, Path]:
    """The .mat files of ``splits`` in directory ``root`` (or its ``svhn/`` subfolder); :class:`DataError`
    listing the expected files when any is missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataNotFound(f"{root}: SVHN is read from a directory holding {', '.join(SVHN_FILES[s] for s in splits)}")
    for d in (root, root / "svhn", root / "SVHN"):
        found = {s: d / SVHN_FILES[s] for s in splits if (d / SVHN_FILES[s]).is_file()}
        if len(found) == len(splits):
            return found
    found = {s: root / SVHN_FILES[s] for s in splits if (root / SVHN_FILES[s]).is_file()}
    missing = [SVHN_FILES[s] for s in splits if s not in found]
    raise DataNotFound(f"{root}: missing {', '.join(missing)}; SVHN (format 2, cropped digits) needs "
                    f"{', '.join(SVHN_FILES[s] for s in splits)} from http://ufldl.stanford.edu/housenumbers/ in this folder")


def read_svhn(files: dict[str, Path]) -> dict[str, np.ndarray]:
    """Arrays ``train_x``/``train_y`` (train + extra, as the paper trains) and ``test_x``/``test_y``."""
    parts = {s: read_svhn_mat(p) for s, p in files.items()}
    train = [parts[s] for s in ("train", "extra") if s in parts]
    return {
        "train_x": np.concatenate([p[0] for p in train]), "train_y": np.concatenate([p[1] for p in train]),
        "test_x": parts["test"][0], "test_y": parts["test"][1],
        "class_names": np.asarray([str(i) for i in range(10)]),
    }
