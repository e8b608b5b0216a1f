"""Image-folder trees (``split/<class>/<image>``, the ImageNet layout) in a directory or a zip.

Images of any format Pillow reads are decoded to RGB (greyscale, palette, CMYK, 16-bit and alpha
images are converted). An image that cannot be decoded raises :class:`DataError` naming it, or with
``skip_bad_images`` is left out and counted.
"""
from __future__ import annotations

import io
import os
import re
import threading
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .archive import ARCHIVE_ERRORS, check_expansion, check_member_name, is_zip
from .errors import DataError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "ImageTree", "decode_image", "list_entries", "open_image", "scan_tree",
           "typical_size"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif")
#: refuse images with more pixels than this (decompression bombs); Pillow's own default limit
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


_PILLOW_LIMIT = threading.Lock()


def open_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """``Image.open`` of ``data`` (reads the header only), with ``max_pixels`` (None: Pillow's own
    limit) deciding which sizes are refused; :class:`DataError` above it. Every image this project
    opens goes through here.

    Pillow refuses images over twice its global ``Image.MAX_IMAGE_PIXELS``; only a limit raised
    above that needs Pillow's check off meanwhile, and that global is then changed under a lock, here
    alone. Limits up to it (the default among them) change no global state."""
    pillow = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            if max_pixels is None or pillow is None or max_pixels <= 2 * pillow:
                im = Image.open(io.BytesIO(data))
            else:
                with _PILLOW_LIMIT:
                    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                    try:
                        im = Image.open(io.BytesIO(data))
                    finally:
                        Image.MAX_IMAGE_PIXELS = saved
        except Image.DecompressionBombError as e:  # over twice Pillow's limit, so over ours too
            size = re.search(r"\((\d+) pixels\)", str(e))
            raise DataError(_too_large(f"{int(size.group(1)):,}-pixel image" if size else "the image", max_pixels)) from None
    if max_pixels is not None and im.width * im.height > max_pixels:
        raise DataError(_too_large(f"{im.width}x{im.height} image", max_pixels))
    return im


def _too_large(what: str, limit: int | None) -> str:
    return (f"{what} exceeds the limit of {limit or 2 * Image.MAX_IMAGE_PIXELS:,} pixels "
            "(possible decompression bomb; raise max_image_pixels to accept it)")


def decode_image(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image in ``data`` as an RGB Pillow image; :class:`DataError` naming ``name`` if it cannot be
    decoded, has more than ``max_pixels`` pixels (None: Pillow's limit only) or is a floating-point
    image with NaN or infinite pixels (which conversion to 8 bits would silently turn into numbers)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = open_image(data, max_pixels)
            im.load()
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):  # 16-bit / float greyscale -> 8 bit
            a = np.asarray(im, dtype=np.float64)
            bad = int((~np.isfinite(a)).sum())
            if bad:
                raise DataError(f"{bad} NaN or infinite pixel value(s) in a floating-point image; refusing to use it")
            a = a / 257.0 if im.mode.startswith("I;16") or a.max() > 255 else a
            im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        return im if im.mode == "RGB" else im.convert("RGB")
    except DataError as e:
        raise DataError(f"{name}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None


@dataclass
class ImageTree:
    """The images of one split of an image-folder tree.

    ``root``: a directory or a zip file; ``prefix``: the split folder inside it (``"train"``, or
    ``""`` when the classes sit at the top). ``files[i]`` is read with :meth:`read` and has label
    ``labels[i]`` (the index of its class folder in sorted ``class_names``). ``ignored``: the files
    under ``prefix`` left out because their suffix is not an image's (hidden files aside). A multi-label
    tree (read from a label file) has ``targets`` (N, L) float32 instead: 1, 0, NaN (ignored).
    """

    root: Path
    prefix: str
    class_names: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ignored: list[str] = field(default_factory=list)
    targets: np.ndarray | None = field(default=None, repr=False)
    _zip: zipfile.ZipFile | None = field(default=None, repr=False)
    _zip_pid: int = field(default=-1, repr=False)

    @property
    def is_zip(self) -> bool:
        return self.root.is_file()

    def location(self, name: str) -> str:
        """Human-readable location of member ``name`` (for messages)."""
        return f"{self.root}:{name}" if self.is_zip else str(self.root / name)

    def read(self, name: str) -> bytes:
        """Raw bytes of ``name`` (a path relative to ``root``); safe to call from worker processes."""
        try:
            if not self.is_zip:
                return (self.root / name).read_bytes()
            if self._zip is None or self._zip_pid != os.getpid():  # one handle per process
                self._zip, self._zip_pid = zipfile.ZipFile(self.root), os.getpid()
            info = self._zip.getinfo(name)
            check_expansion(self.root, f"member {name!r}", info.file_size, info.compress_size)
            return self._zip.read(info)
        except (FileNotFoundError, KeyError):
            raise DataError(f"{self.location(name)}: file missing") from None
        except ARCHIVE_ERRORS as e:
            raise DataError(f"{self.location(name)}: cannot read ({type(e).__name__}: {e})") from None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zip"], state["_zip_pid"] = None, -1
        return state

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        """One line (``files`` may hold a million names); every field is an attribute."""
        where = f"{self.root}:{self.prefix}" if self.is_zip else str(self.root / self.prefix)
        return f"ImageTree({where}: {len(self.class_names)} classes, {len(self.files):,} images)"


def list_entries(root: Path) -> list[tuple[str, bool]]:
    """(relative POSIX path, is_dir) of everything under a directory or in a zip (names checked).

    In a directory, links to folders are followed, also out of the tree (a class folder may be a link
    to where the images are, as with torchvision's ImageFolder); a folder reached a second time (a
    link loop, or two links to one folder) is listed but not entered again."""
    if is_zip(root):
        try:
            with zipfile.ZipFile(root) as z:
                infos = z.infolist()
        except ARCHIVE_ERRORS as e:
            raise DataError(f"{root}: truncated or corrupt zip archive ({type(e).__name__}: {e})") from None
        out = []
        for i in infos:
            name = check_member_name(root, i.filename)
            out.append((name, i.is_dir()))
            parts = name.split("/")  # zips often omit directory entries: infer them
            out.extend(("/".join(parts[:k]), True) for k in range(1, len(parts)))
        return out
    if not root.is_dir():
        raise DataError(f"{root}: not a directory or zip archive")
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        rel = Path(dirpath).relative_to(root).as_posix()
        rel = "" if rel == "." else rel + "/"
        out.extend((rel + d, True) for d in dirnames)
        out.extend((rel + f, False) for f in filenames)
    return out


def scan_tree(root: str | os.PathLike, splits: tuple[str, ...] | None, required: bool = True,
              suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> dict[str, ImageTree]:
    """The splits of an image-folder tree at ``root`` (directory or zip).

    ``splits``: the split folders to look for, e.g. ``("train", "val", "test")``; those present are
    returned (none: :class:`DataError`, or ``{}`` if not ``required``). None: the classes sit at the
    top (one tree, key ``""``). ``suffixes``: the files that count (images by default). A tree wrapped in a single
    top folder (``cifar10/train/...``, ``own/<class>/...``) is found too. Empty class folders, trees without classes and
    splits whose class folders differ raise :class:`DataError`.
    """
    root = Path(root)
    entries = list_entries(root)
    dirs = {n for n, d in entries if d}
    files = sorted(n for n, d in entries if not d)
    base = ""
    tops = {n for n in dirs if "/" not in n}
    if len(tops) == 1 and (splits is None or not tops & set(splits)):
        top = next(iter(tops))
        if splits is not None or any(n.startswith(top + "/") and "/" not in n[len(top) + 1:] for n in dirs):
            base = top + "/"  # wrapped: <top>/train/... or <top>/<class>/...
    wanted = [""] if splits is None else [s for s in splits if base + s in dirs]
    if not wanted and not required:
        return {}
    if not wanted:
        raise DataError(f"{root}: no image-folder tree found: expected folders {' or '.join(splits or ())} "
                        f"holding one folder per class (e.g. train/<class>/<image>.jpg)")
    trees: dict[str, ImageTree] = {}
    for split in wanted:
        prefix = base + split + "/" if split else base
        classes = sorted(n[len(prefix):] for n in dirs
                         if n.startswith(prefix) and "/" not in n[len(prefix):] and n != prefix[:-1])
        classes = [c for c in classes if c and not c.startswith(".")]
        if not classes:
            raise DataError(f"{root}: {prefix or 'top level'} holds no class folders (expected {prefix}<class>/<image>)")
        index = {c: i for i, c in enumerate(classes)}
        names, labels, counts, ignored = [], [], [0] * len(classes), []
        for f in files:
            if not f.startswith(prefix):
                continue
            cls, _, rest = f[len(prefix):].partition("/")
            if f[len(prefix):].startswith(".") or "/." in f[len(prefix):]:
                continue  # hidden files and folders
            if not f.lower().endswith(suffixes) or not rest or cls not in index:
                ignored.append(f)
                continue
            names.append(f)
            labels.append(index[cls])
            counts[index[cls]] += 1
        empty = [c for c, n in zip(classes, counts) if n == 0]
        if empty:
            raise DataError(f"{root}: empty class folder(s) in {prefix or 'top level'}: {', '.join(empty[:10])}"
                            f"{' ...' if len(empty) > 10 else ''} (no images with suffix {', '.join(suffixes)})")
        trees[split] = ImageTree(root, prefix, classes, names, np.asarray(labels, np.int64), ignored)
    first = next(iter(trees.values()))
    for t in trees.values():
        if t.class_names != first.class_names:
            diff = sorted(set(t.class_names) ^ set(first.class_names))
            raise DataError(f"{root}: the class folders of {t.prefix} and {first.prefix} differ: {', '.join(diff[:10])}")
    return trees


def typical_size(tree: ImageTree, indices: np.ndarray | None = None, samples: int = 16,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """The median (width, height) in pixels of up to ``samples`` images of ``tree`` (of ``indices``),
    spread evenly over them; only the headers are decoded. None when none of them can be opened."""
    idx = np.arange(len(tree)) if indices is None else np.asarray(indices)
    if not len(idx):
        return None
    chosen = idx[np.unique(np.linspace(0, len(idx) - 1, min(samples, len(idx))).round().astype(np.int64))]
    sizes = []
    for i in chosen:
        try:
            im = open_image(tree.read(tree.files[i]), max_pixels)
        except (DataError, UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
            continue
        sizes.append(im.size)
    if not sizes:
        return None
    w, h = np.median(np.asarray(sizes), axis=0)
    return int(round(w)), int(round(h))
