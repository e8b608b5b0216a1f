"""CIFAR-10 and CIFAR-100 from their official releases (binary and python), archives or folders,
and from image-folder trees / zips of them (e.g. the CIFAR-10 JPEG copy).

Everything is decoded to uint8 arrays: ``train_x``/``test_x`` (N, 3, 32, 32), ``train_y``/``test_y``
(N,) int64, ``class_names``; CIFAR-100 adds ``train_coarse``/``test_coarse`` and ``coarse_names``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .archive import is_tar, is_zip, iter_tar_files
from .errors import DataError, DataNotFound
from .folder import DEFAULT_MAX_PIXELS, decode_image, scan_tree
from .safe_pickle import safe_loads

__all__ = ["LAYOUTS", "read_cifar", "find_cifar", "parse_binary", "parse_python_batch", "read_image_tree_32"]

RECORD_PIXELS = 3 * 32 * 32

# kind -> format -> (folder in the archive, train files, test files, meta files, archive name)
LAYOUTS: dict[str, dict[str, tuple[str, list[str], list[str], list[str], str]]] = {
    "cifar10": {
        "binary": ("cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"],
                   ["batches.meta.txt"], "cifar-10-binary.tar.gz"),
        "python": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                   ["batches.meta"], "cifar-10-python.tar.gz"),
    },
    "cifar100": {
        "binary": ("cifar-100-binary", ["train.bin"], ["test.bin"],
                   ["fine_label_names.txt", "coarse_label_names.txt"], "cifar-100-binary.tar.gz"),
        "python": ("cifar-100-python", ["train"], ["test"], ["meta"], "cifar-100-python.tar.gz"),
    },
}


def parse_binary(data: bytes, name: str, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` label bytes + 3072 pixel bytes -> (images (N, 3, 32, 32) uint8,
    labels (N, label_bytes) int64)."""
    rec = label_bytes + RECORD_PIXELS
    if len(data) == 0 or len(data) % rec:
        raise DataError(f"{name}: {len(data)} bytes is not a whole number of {rec}-byte records "
                        f"({label_bytes} label byte(s) + {RECORD_PIXELS} pixels): truncated or not a CIFAR batch")
    a = np.frombuffer(data, np.uint8).reshape(-1, rec)
    return a[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), a[:, :label_bytes].astype(np.int64)


def _get(d: dict, key: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(key)


def parse_python_batch(data: bytes, name: str, label_keys: tuple[str, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """A pickled batch (dict with ``data`` (N, 3072) uint8 and label lists) -> (images (N, 3, 32, 32),
    one (N,) int64 array per key of ``label_keys``)."""
    d = safe_loads(data, name)
    try:
        if not isinstance(d, dict):
            raise TypeError(f"a {type(d).__name__}, not a dict")
        x = np.asarray(_get(d, "data"))
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != RECORD_PIXELS:
            raise ValueError(f"'data' is {x.dtype} {x.shape}, expected uint8 (N, {RECORD_PIXELS})")
        labels = [np.asarray(_get(d, k), dtype=np.int64).reshape(-1) for k in label_keys]
        for k, y in zip(label_keys, labels):
            if len(y) != len(x):
                raise ValueError(f"{len(y)} '{k}' for {len(x)} images")
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{name}: not a CIFAR python batch ({type(e).__name__}: {e}); expected a dict with "
                        f"'data' and {', '.join(repr(k) for k in label_keys)}") from None
    return x.reshape(-1, 3, 32, 32), labels


def _names_txt(data: bytes) -> list[str]:
    return [s.strip() for s in data.decode("utf-8", "replace").splitlines() if s.strip()]


def _names_py(data: bytes, name: str, key: str) -> list[str]:
    d = safe_loads(data, name)
    try:
        return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in _get(d, key)]
    except (KeyError, TypeError) as e:
        raise DataError(f"{name}: no {key!r} list in this meta file ({e})") from None


def _check_labels(y: np.ndarray, n: int, name: str, what: str = "label") -> None:
    if len(y) and (y.min() < 0 or y.max() >= n):
        bad = int(np.flatnonzero((y < 0) | (y >= n))[0])
        raise DataError(f"{name}: {what} {int(y[bad])} of record {bad} is out of range 0..{n - 1}")


def _decode(kind: str, fmt: str, files: dict[str, bytes], where: str) -> dict[str, np.ndarray]:
    """Arrays from the release's files (base name -> content)."""
    folder, train, test, meta, _ = LAYOUTS[kind][fmt]
    loc = lambda f: f"{where}/{f}"  # noqa: E731
    out: dict[str, np.ndarray] = {}
    if kind == "cifar10":
        names = _names_txt(files[meta[0]]) if fmt == "binary" else _names_py(files[meta[0]], loc(meta[0]), "label_names")
        coarse_names: list[str] = []
    elif fmt == "binary":
        names, coarse_names = _names_txt(files[meta[0]]), _names_txt(files[meta[1]])
    else:
        names = _names_py(files[meta[0]], loc(meta[0]), "fine_label_names")
        coarse_names = _names_py(files[meta[0]], loc(meta[0]), "coarse_label_names")
    for split, members in (("train", train), ("test", test)):
        xs, ys, cs = [], [], []
        for m in members:
            if fmt == "binary":
                x, lab = parse_binary(files[m], loc(m), 1 if kind == "cifar10" else 2)
                y, c = (lab[:, 0], None) if kind == "cifar10" else (lab[:, 1], lab[:, 0])  # CIFAR-100: coarse, fine
            else:
                keys = ("labels",) if kind == "cifar10" else ("fine_labels", "coarse_labels")
                x, labs = parse_python_batch(files[m], loc(m), keys)
                y, c = labs[0], (labs[1] if len(labs) > 1 else None)
            _check_labels(y, len(names), loc(m))
            if c is not None:
                _check_labels(c, len(coarse_names), loc(m), "coarse label")
                cs.append(c)
            xs.append(x)
            ys.append(y)
        out[f"{split}_x"] = np.concatenate(xs)
        out[f"{split}_y"] = np.concatenate(ys)
        if cs:
            out[f"{split}_coarse"] = np.concatenate(cs)
    out["class_names"] = np.asarray(names)
    if coarse_names:
        out["coarse_names"] = np.asarray(coarse_names)
    return out


def _needed(kind: str, fmt: str) -> list[str]:
    _, train, test, meta, _ = LAYOUTS[kind][fmt]
    return train + test + meta


def _read_archive(kind: str, path: Path) -> dict[str, np.ndarray]:
    wanted = {fmt: set(_needed(kind, fmt)) for fmt in LAYOUTS[kind]}
    files: dict[str, bytes] = {}
    for name, data in iter_tar_files(path):
        base = name.rsplit("/", 1)[-1]
        if any(base in w for w in wanted.values()):
            files[base] = data
    for fmt, need in wanted.items():
        if need & files.keys():
            missing = sorted(need - files.keys())
            if missing:
                raise DataError(f"{path}: archive lacks {', '.join(missing)} (the official {LAYOUTS[kind][fmt][4]} holds "
                                f"{LAYOUTS[kind][fmt][0]}/{{{','.join(_needed(kind, fmt))}}})")
            return _decode(kind, fmt, files, f"{path}:{LAYOUTS[kind][fmt][0]}")
    raise DataError(f"{path}: not a {kind} archive: expected members "
                    + " or ".join(f"{v[0]}/{{{','.join(_needed(kind, f))}}}" for f, v in LAYOUTS[kind].items()))


def _read_folder(kind: str, fmt: str, folder: Path) -> dict[str, np.ndarray]:
    need = _needed(kind, fmt)
    missing = [f for f in need if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} (an extracted {LAYOUTS[kind][fmt][4]} holds "
                        f"{', '.join(need)})")
    return _decode(kind, fmt, {f: (folder / f).read_bytes() for f in need}, str(folder))


def read_image_tree_32(root: Path, skip_bad_images: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                       log: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """An image-folder tree (dir or zip) with ``train/`` and ``test/`` of 32x32 images, decoded whole."""
    trees = scan_tree(root, ("train", "test"))
    if set(trees) != {"train", "test"}:
        raise DataError(f"{root}: expected both train/<class>/ and test/<class>/ folders; found only {', '.join(trees)}/")
    out: dict[str, np.ndarray] = {"class_names": np.asarray(trees["train"].class_names)}
    skipped: list[str] = []
    for split, tree in trees.items():
        x = np.empty((len(tree), 3, 32, 32), np.uint8)
        keep = np.ones(len(tree), bool)
        for i, f in enumerate(tree.files):
            try:
                im = decode_image(tree.read(f), tree.location(f), max_pixels)
                if im.size != (32, 32):
                    raise DataError(f"{tree.location(f)}: image is {im.width}x{im.height}, expected 32x32")
            except DataError:
                if not skip_bad_images:
                    raise
                skipped.append(tree.location(f))
                keep[i] = False
                continue
            x[i] = np.asarray(im, np.uint8).transpose(2, 0, 1)
        out[f"{split}_x"], out[f"{split}_y"] = x[keep], tree.labels[keep]
    if skipped and log:
        log(f"skipped {len(skipped)} undecodable image(s), e.g. {skipped[0]}")
    out["skipped"] = np.asarray(skipped, dtype=str)
    return out


def find_cifar(kind: str, root: str | os.PathLike) -> tuple[str, Path]:
    """Where the ``kind`` data under ``root`` is: (form, path) with form one of ``"archive"``,
    ``"binary"``/``"python"`` (an extracted folder) or ``"images"`` (image-folder tree or zip).
    :class:`DataError` listing what was expected when nothing fits."""
    root = Path(root).expanduser()
    if root.is_file():
        if is_zip(root):
            return "images", root
        if is_tar(root):
            return "archive", root
        raise DataError(f"{root}: neither a tar archive (the official {kind} release) nor a zip of image folders")
    if not root.exists():
        raise DataNotFound(f"{root}: no such file or directory")
    candidates: list[tuple[str, Path]] = []
    for fmt, (folder, *_rest, archive) in LAYOUTS[kind].items():
        first = _needed(kind, fmt)[0]
        candidates += [(fmt, root), (fmt, root / folder), ("archive", root / archive)]
        for form, p in candidates[-3:]:
            if (form == "archive" and p.is_file()) or (form != "archive" and (p / first).is_file()):
                return form, p
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "images", root
    if kind == "cifar10" and (root / "cifar10-jpeg.zip").is_file():
        return "images", root / "cifar10-jpeg.zip"
    layouts = LAYOUTS[kind]
    raise DataNotFound(
        f"no {kind} data in {root}. Expected one of: "
        + "; ".join(f"{v[4]} (the official {f} release) or its extracted folder {v[0]}/ with {', '.join(_needed(kind, f))}"
                    for f, v in layouts.items())
        + "; or an image-folder tree train/<class>/*.png + test/<class>/*.png (a folder or a .zip)"
        + (" such as cifar10-jpeg.zip" if kind == "cifar10" else "")
    )


def read_cifar(kind: str, form: str, path: Path, **image_options) -> dict[str, np.ndarray]:
    """Decode what :func:`find_cifar` found into the arrays described in the module docstring."""
    if form == "archive":
        return _read_archive(kind, path)
    if form == "images":
        return read_image_tree_32(path, **image_options)
    return _read_folder(kind, form, path)
