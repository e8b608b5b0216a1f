"""A real multi-label task built from CIFAR-10: 64x64 mosaics of 2x2 cells, labels = the classes present.

    python -m densenet.data.mosaic /work/shared/data/cifar10-jpeg.zip mosaics/ [--train 8000 --val 1000 --test 2000]

Each 32x32 cell holds a CIFAR-10 image or is empty (black) with probability ``empty``; every mosaic has
at least one image, and a class may fill several cells. Train and val mosaics take their images from
CIFAR's ``train/``, test mosaics from its ``test/``, each image at most once over all mosaics. Writes
``out/images/<split>/<index:06d>.png`` (index from 0) and, last, ``out/labels.csv`` in CheXpert's layout
(``Path``, ``Split``, then one column per class holding 1.0 or 0.0), which
:func:`densenet.data.label_file.read_label_file` reads. The same arguments give byte-identical files.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..io.atomic import atomic_write_text
from .archive import ARCHIVE_ERRORS
from .errors import DataError, DataNotFound
from .folder import IMAGE_SUFFIXES, ImageTree, decode_image

__all__ = ["CLASSES", "CELL", "SPLITS", "make_mosaics", "main"]

#: the CIFAR-10 class folders in the usual label order 0..9 (also the CSV's label columns)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CELL = 32  # side of a cell and of a CIFAR image, pixels; a mosaic is 2x2 cells, 64x64
SPLITS = ("train", "val", "test")
SOURCE = {"train": "train", "val": "train", "test": "test"}  # the CIFAR folder each split draws from


def _check_args(counts: dict[str, int], empty: float, seed: int) -> None:
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise DataError(f"{name}={n!r}: the number of {name} mosaics must be a positive integer")
    if isinstance(empty, bool) or not isinstance(empty, (int, float)) or not 0.0 <= empty < 1.0:
        raise DataError(f"empty={empty!r}: the probability that a cell is empty must be a number in [0, 1) "
                        "(1 would leave every cell empty)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed={seed!r}: the random seed must be a non-negative integer")


def _list_sources(path: Path, z: zipfile.ZipFile) -> dict[str, tuple[list[str], np.ndarray]]:
    """{"train"/"test": (member names, class indices (N,) int64)}, sorted by class then name."""
    by_folder: dict[tuple[str, str], list[str]] = {}
    for info in z.infolist():
        parts = info.filename.split("/")
        if not info.is_dir() and len(parts) == 3 and parts[2].lower().endswith(IMAGE_SUFFIXES):
            by_folder.setdefault((parts[0], parts[1]), []).append(info.filename)
    found: dict[str, tuple[list[str], np.ndarray]] = {}
    missing = []
    for split in ("train", "test"):
        members: list[str] = []
        labels: list[int] = []
        for k, cls in enumerate(CLASSES):
            inside = sorted(by_folder.get((split, cls), []))
            if not inside:
                missing.append(f"{split}/{cls}/")
            members += inside
            labels += [k] * len(inside)
        found[split] = (members, np.asarray(labels, np.int64))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{path}: no images in {shown}; expected the CIFAR-10 JPEG zip's layout, train/<class>/<NNNN>.jpg "
                        f"and test/<class>/<NNNN>.jpg for each class of {', '.join(CLASSES)}")
    return found


def _empty_masks(rng: np.random.Generator, counts: dict[str, int], empty: float) -> dict[str, np.ndarray]:
    """{split: (n, 4) bool, True = empty cell}; cells empty with probability ``empty``, redrawn for a mosaic
    left without any image (so the draw is conditioned on at least one image)."""
    masks = {}
    for split, n in counts.items():
        mask = rng.random((n, 4)) < empty
        while (bad := np.flatnonzero(mask.all(axis=1))).size:
            mask[bad] = rng.random((bad.size, 4)) < empty
        masks[split] = mask
    return masks


def _read_cell(tree: ImageTree, name: str) -> np.ndarray:
    """The image ``name`` of the zip as (32, 32, 3) uint8 RGB; :class:`DataError` naming it otherwise."""
    where = tree.location(name)
    im = decode_image(tree.read(name), where)
    if im.size != (CELL, CELL):
        raise DataError(f"{where}: a {im.width}x{im.height} image; a mosaic cell takes a {CELL}x{CELL} CIFAR-10 image")
    return np.asarray(im, dtype=np.uint8)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_mosaics(cifar_zip: str | os.PathLike, out: str | os.PathLike, *, train: int = 8000, val: int = 1000, test: int = 2000,
                 empty: float = 0.25, seed: int = 0) -> Path:
    """Build the mosaic dataset from the CIFAR-10 JPEG zip into folder ``out``; returns ``out/labels.csv``.

    ``train``/``val``/``test``: mosaics per split; ``empty``: probability in [0, 1) that a cell is
    empty; ``seed``: of ``numpy.random.default_rng``. Cell k (0..3) of a mosaic sits at row k // 2,
    column k % 2. Images are written first and the CSV last (atomically): a folder holding
    ``labels.csv`` is complete. :class:`DataError` for a missing or malformed zip, bad counts or
    ``empty``, more image cells than CIFAR images, or an ``out`` that already holds a ``labels.csv``.
    """
    counts = {"train": train, "val": val, "test": test}
    _check_args(counts, empty, seed)
    path, out = Path(cifar_zip), Path(out)
    csv_path = out / "labels.csv"
    if csv_path.exists():
        raise DataError(f"{csv_path} already exists: pick another folder for the mosaics or delete that one")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file: the mosaics need a folder (pick another name)")
    if not path.is_file():
        raise DataNotFound(f"{path}: CIFAR-10 zip not found (expected cifar10-jpeg.zip, with train/<class>/<NNNN>.jpg "
                           "and test/<class>/<NNNN>.jpg)")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a zip file; expected the CIFAR-10 JPEG zip (cifar10-jpeg.zip)")

    rng = np.random.default_rng(seed)
    masks = _empty_masks(rng, counts, empty)
    try:
        z = zipfile.ZipFile(path)
    except ARCHIVE_ERRORS as e:
        raise DataError(f"{path}: cannot open the zip ({type(e).__name__}: {e})") from None
    with z:
        sources = _list_sources(path, z)
        tree = ImageTree(path, "")  # reads the cells: the expansion check and read errors of image folders
        # cells[split]: (n, 4) index into sources[SOURCE[split]], -1 = empty; each source image used once
        cells: dict[str, np.ndarray] = {}
        for source in ("train", "test"):
            splits = [s for s in SPLITS if SOURCE[s] == source]
            needed = sum(int((~masks[s]).sum()) for s in splits)
            pool = len(sources[source][0])
            if needed > pool:
                asked = " and ".join(f"{counts[s]:,} {s}" for s in splits)
                raise DataError(f"{path}: the {asked} mosaics have {needed:,} image cells (empty={empty:g}) but {source}/ "
                                f"holds {pool:,} images, each used once: ask for fewer mosaics or raise empty")
            order = rng.permutation(pool)
            start = 0
            for s in splits:
                idx = np.full((counts[s], 4), -1, np.int64)
                k = int((~masks[s]).sum())
                idx[~masks[s]] = order[start:start + k]
                start += k
                cells[s] = idx

        rows: list[list[str]] = []
        for split in SPLITS:
            folder = out / "images" / split
            folder.mkdir(parents=True, exist_ok=True)
            members, labels = sources[SOURCE[split]]
            for i, idx in enumerate(cells[split]):
                mosaic = np.zeros((2 * CELL, 2 * CELL, 3), np.uint8)
                present = np.zeros(len(CLASSES), bool)
                for k, j in enumerate(idx):
                    if j < 0:
                        continue
                    r, c = divmod(k, 2)
                    mosaic[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = _read_cell(tree, members[j])
                    present[labels[j]] = True
                rel = f"images/{split}/{i:06d}.png"
                (out / rel).write_bytes(_png(mosaic))
                rows.append([rel, split, *("1.0" if p else "0.0" for p in present)])

    if hasattr(os, "sync"):
        os.sync()  # the images reach the disk before the CSV that says they are complete
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["Path", "Split", *CLASSES])
    writer.writerows(rows)
    atomic_write_text(csv_path, text.getvalue())
    return csv_path


def _summary(csv_path: Path) -> str:
    """One line: the mosaics per split and the share of mosaics holding each class."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    per_split = {s: sum(r["Split"] == s for r in rows) for s in SPLITS}
    share = {c: sum(float(r[c]) for r in rows) / max(len(rows), 1) for c in CLASSES}
    frequencies = ", ".join(f"{c} {100 * v:.1f}%" for c, v in share.items())
    return (f"wrote {csv_path}: {', '.join(f'{n:,} {s}' for s, n in per_split.items())} mosaics "
            f"({2 * CELL}x{2 * CELL} PNG); share of mosaics holding each class: {frequencies}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: build the mosaics, print one line; ``error: ...`` and status 2 on bad input."""
    p = argparse.ArgumentParser(prog="python -m densenet.data.mosaic", description=__doc__.split("\n\n")[0])
    p.add_argument("cifar_zip", help="cifar10-jpeg.zip (train/<class>/<NNNN>.jpg and test/<class>/<NNNN>.jpg)")
    p.add_argument("out", help="folder to write images/<split>/<index>.png and labels.csv into")
    p.add_argument("--train", type=int, default=8000, help="train mosaics (default 8000)")
    p.add_argument("--val", type=int, default=1000, help="val mosaics (default 1000)")
    p.add_argument("--test", type=int, default=2000, help="test mosaics (default 2000)")
    p.add_argument("--empty", type=float, default=0.25, help="probability that a cell is empty, in [0, 1) (default 0.25)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    try:
        csv_path = make_mosaics(args.cifar_zip, args.out, train=args.train, val=args.val, test=args.test,
                                empty=args.empty, seed=args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_summary(csv_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
