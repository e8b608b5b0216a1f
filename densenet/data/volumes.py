"""Volumes and signals: a folder per class of NIfTI volumes (``.nii``, ``.nii.gz``) or ``.npy`` arrays
(``volumes``, 3-D), or of ``.npy`` signals shaped (channels, length) (``signals``, 1-D).

Every file is read from bytes with the same safety as the image readers: the header is checked
before any data is touched (known element type, at most ``max_values`` values, the declared data
present in full), gzip content expands within the archive limit (:func:`archive.check_expansion`),
NaN and infinite values are refused, and every failure is a :class:`DataError` naming the file.
NIfTI needs nibabel (``pip install 'densenet[volumes]'``); ``.npy`` files need nothing more.

Preprocessing: each volume (each channel) is normalised to mean 0 and standard deviation 1, then
fitted to the requested size: ``"resample"`` (the default: trilinear interpolation of the whole
volume) or ``"crop"`` (a centre crop, zero-padded where the volume is smaller). Training adds a random
crop (a box of 80-100% of each side, resampled; with ``"crop"``: a random window) and a flip along
each axis with probability 1/2. Signals are cropped (training: a random window) or zero-padded to
the length. All randomness of an item is a function of (seed, epoch, position in the epoch), so
batches, resumes and shards agree exactly as with the other loaders.
"""
from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .archive import EXPANSION_FREE_BYTES, check_expansion, max_expansion
from .errors import DataError, ExpansionRefused
from .folder import ImageTree, scan_tree
from .loader import _Base
from .transforms import derive_seed

__all__ = ["DEFAULT_MAX_VALUES", "SIGNAL_SUFFIXES", "VOLUME_DATASETS", "VOLUME_SUFFIXES", "MAX_CHANNELS", "VolumeLoader",
           "fit_signal", "fit_volume", "normalise", "read_signal", "read_volume", "volume_size"]

VOLUME_DATASETS = {"volumes": 3, "signals": 1}  # name -> spatial dimensions
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")
SIGNAL_SUFFIXES = (".npy",)
#: refuse files with more values than this (voxels x channels): 2**28, 1 GiB as float32
DEFAULT_MAX_VALUES = 1 << 28
#: at most this many channels (a 4-D NIfTI's 4th axis, a (C, D, H, W) array's first)
MAX_CHANNELS = 64
DEFAULT_VOLUME_SIZE = 64
_AUGMENT = 2  # the seed stream of the other loaders' augmentation
_NUMERIC = "biuf"  # numpy kinds accepted: bool, signed and unsigned integers, floats


# ---------------------------------------------------------------------------- reading
def _check_values(shape: Sequence[int], name: str, max_values: int | None) -> int:
    count = math.prod(int(s) for s in shape)
    if any(int(s) < 0 for s in shape):
        raise DataError(f"{name}: negative size in shape {tuple(shape)}")
    if max_values is not None and count > max_values:
        raise DataError(f"{name}: {'x'.join(map(str, shape))} = {count:,} values exceeds the limit of {max_values:,} "
                        "(raise max_image_pixels to accept it)")
    return count


def _finite(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise DataError(f"{name}: {bad} NaN or infinite value(s) (or values beyond float32's range); refusing to use it")
    return a


def read_npy(data: bytes, name: str, max_values: int | None = DEFAULT_MAX_VALUES) -> np.ndarray:
    """The array of a ``.npy`` file's bytes (numeric types only, never pickled objects), after checking
    its header: the shape within ``max_values`` and the declared data present in full."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"unknown .npy version {version}")
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f, max_header_size=10_000)
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises an open set (tokenize.TokenError, ...)
        raise DataError(f"{name}: not a readable .npy file ({type(e).__name__}: {e})") from None
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC or dtype.fields is not None or dtype.subdtype:
        raise DataError(f"{name}: unsupported element type {dtype!r} (numbers only)")
    count = _check_values(shape, name, max_values)
    need, have = count * dtype.itemsize, len(data) - f.tell()
    if have < need:
        raise DataError(f"{name}: truncated: the header declares {need:,} bytes of data, the file holds {have:,}")
    a = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell())
    return _finite(a.reshape(shape, order="F" if fortran else "C"), name)


def _gunzip(data: bytes, name: str) -> bytes:
    """The content of gzip ``data``, refused before it expands past the archive limit (a bomb)."""
    limit = max_expansion()
    cap = int(max(EXPANSION_FREE_BYTES, limit * max(len(data), 1))) + 1
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
            out = g.read(cap)
    except (OSError, EOFError, zlib.error, ValueError, struct.error) as e:
        raise DataError(f"{name}: truncated or corrupt gzip data ({type(e).__name__}: {e})") from None
    if len(out) >= cap:
        check_expansion(name, "gzip content", len(out), len(data), limit)
        raise ExpansionRefused(f"{name}: refused gzip content of more than {cap - 1:,} bytes")  # not reached
    return out


def _nibabel() -> Any:
    try:
        import nibabel  # an optional dependency: only NIfTI files need it
    except ImportError:
        raise DataError("reading NIfTI volumes (.nii, .nii.gz) needs nibabel: pip install 'densenet[volumes]' "
                        "(or pip install nibabel); .npy volumes need nothing more") from None
    return nibabel


def read_nifti(data: bytes, name: str, max_values: int | None = DEFAULT_MAX_VALUES) -> np.ndarray:
    """The voxels of a NIfTI-1 or NIfTI-2 file's bytes (gzip-compressed or not) as float32, scaled by
    the header's slope and intercept, after checking the header (shape within ``max_values``, a
    numeric data type, the declared data present in full)."""
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data, name)
    nib = _nibabel()
    if len(data) < 4:
        raise DataError(f"{name}: not a NIfTI file ({len(data)} bytes)")
    size = {struct.unpack("<i", data[:4])[0], struct.unpack(">i", data[:4])[0]}
    kind = nib.Nifti1Image if 348 in size else nib.Nifti2Image if 540 in size else None
    if kind is None:
        raise DataError(f"{name}: not a NIfTI file (header size field {struct.unpack('<i', data[:4])[0]}, "
                        "expected 348 or 540)")
    try:
        image = kind.from_bytes(data)
        header = image.header
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        # where the voxels start: after the header and its 4-byte extension flag at least
        offset = max(int(float(header["vox_offset"])), int(header["sizeof_hdr"]) + 4)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types on malformed headers
        raise DataError(f"{name}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if dtype.kind not in _NUMERIC or dtype.fields is not None:
        raise DataError(f"{name}: unsupported NIfTI data type {dtype} (numbers only)")
    count = _check_values(shape, name, max_values)
    need = offset + count * dtype.itemsize
    if len(data) < need:
        raise DataError(f"{name}: truncated: the header declares {need:,} bytes, the file holds {len(data):,}")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            a = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - as above, for the data and its scaling
        raise DataError(f"{name}: cannot read the NIfTI data ({type(e).__name__}: {e})") from None
    return _finite(a, name)


def _as_channels(a: np.ndarray, name: str, spatial_dims: int, channels_first: bool) -> np.ndarray:
    """(C, *spatial) float32 from an array of ``spatial_dims`` axes, or one more for channels (first for
    .npy, last for NIfTI, where further singleton axes are dropped)."""
    if not channels_first:  # NIfTI: (X, Y, Z[, T[, C]]) -> (channels, X, Y, Z)
        extra = a.shape[spatial_dims:]
        a = a.reshape(*a.shape[:spatial_dims], math.prod(extra)) if len(a.shape) > spatial_dims else a[..., None]
        a = np.moveaxis(a, -1, 0)
    elif a.ndim == spatial_dims:
        a = a[None]
    if a.ndim != spatial_dims + 1:
        what = {1: "(length) or (channels, length)", 3: "(D, H, W) or (channels, D, H, W)"}[spatial_dims]
        raise DataError(f"{name}: an array of shape {tuple(a.shape)} is not a {'signal' if spatial_dims == 1 else 'volume'}: "
                        f"expected {what}")
    if not 1 <= a.shape[0] <= MAX_CHANNELS:
        raise DataError(f"{name}: {a.shape[0]} channels (at most {MAX_CHANNELS}), shape {tuple(a.shape)}")
    if min(a.shape[1:]) < 1:
        raise DataError(f"{name}: empty {'signal' if spatial_dims == 1 else 'volume'}, shape {tuple(a.shape)}")
    with np.errstate(over="ignore", invalid="ignore"):
        a = np.ascontiguousarray(a, dtype=np.float32)
    return _finite(a, name)  # again in float32: a float64 value past its range is infinite there


def read_volume(data: bytes, name: str, max_values: int | None = DEFAULT_MAX_VALUES) -> np.ndarray:
    """A volume file's bytes (``.nii``, ``.nii.gz`` or ``.npy``, told apart by content) -> (C, D, H, W) float32."""
    if data[:6] == b"\x93NUMPY":
        return _as_channels(read_npy(data, name, max_values), name, 3, channels_first=True)
    return _as_channels(read_nifti(data, name, max_values), name, 3, channels_first=False)


def read_signal(data: bytes, name: str, max_values: int | None = DEFAULT_MAX_VALUES) -> np.ndarray:
    """A ``.npy`` signal's bytes, shaped (length) or (channels, length) -> (C, L) float32."""
    return _as_channels(read_npy(data, name, max_values), name, 1, channels_first=True)


# ---------------------------------------------------------------------------- preprocessing
def normalise(a: np.ndarray) -> np.ndarray:
    """Each channel of (C, ...) to mean 0 and standard deviation 1 (a constant channel to 0), float32."""
    flat = a.reshape(a.shape[0], -1).astype(np.float64)
    mean = flat.mean(1, keepdims=True)
    std = flat.std(1, keepdims=True)
    out = (flat - mean) / np.where(std > 1e-12, std, 1.0)
    return out.astype(np.float32).reshape(a.shape)


def _resample(a: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(C, *sides) -> (C, *size) by linear (trilinear) interpolation (half-pixel centres)."""
    if tuple(a.shape[1:]) == tuple(size):
        return a
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    t = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(a))[None], size=tuple(size), mode=mode,
                                        align_corners=False)
    return t[0].numpy()


def _window(a: np.ndarray, starts: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """(C, *size) window of ``a`` at ``starts`` (negative or past the end: zeros there)."""
    out = np.zeros((a.shape[0], *size), np.float32)
    src, dst = [slice(None)], [slice(None)]
    for s, n, side in zip(starts, size, a.shape[1:]):
        lo, hi = max(s, 0), min(s + n, side)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    out[tuple(dst)] = a[tuple(src)]
    return out


def fit_volume(a: np.ndarray, size: Sequence[int], rng: np.random.Generator | None = None, fit: str = "resample"
               ) -> np.ndarray:
    """A normalised (C, D, H, W) volume at ``size``; with ``rng`` (training) a random crop and flips."""
    sides = a.shape[1:]
    if fit == "crop":
        if rng is None:
            starts = [(s - n) // 2 for s, n in zip(sides, size)]
        else:
            starts = [int(rng.integers(min(0, s - n), max(0, s - n) + 1)) for s, n in zip(sides, size)]
        out = _window(a, starts, size)
    elif rng is None:
        out = _resample(a, size)
    else:  # a box of 80-100% of each side at a random place, resampled to the size
        box = [max(1, int(round(s * rng.uniform(0.8, 1.0)))) for s in sides]
        starts = [int(rng.integers(0, s - b + 1)) for s, b in zip(sides, box)]
        out = _resample(a[(slice(None), *(slice(st, st + b) for st, b in zip(starts, box)))], size)
    if rng is not None:
        flips = [axis + 1 for axis in range(len(size)) if rng.random() < 0.5]
        if flips:
            out = np.flip(out, flips)
    return np.ascontiguousarray(out, dtype=np.float32)


def fit_signal(a: np.ndarray, length: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A normalised (C, L) signal at ``length``: a centre window (training: a random one), zero-padded."""
    side = a.shape[1]
    start = (side - length) // 2 if rng is None else int(rng.integers(min(0, side - length), max(0, side - length) + 1))
    return _window(a, [start], [length])


def volume_size(image_size: int | Sequence[int] | None, spatial_dims: int, default: int) -> tuple[int, ...]:
    """``image_size`` as one side per axis: None -> ``default``, one int -> the same on every axis."""
    if image_size is None:
        image_size = default
    sizes = [image_size] if isinstance(image_size, int) else list(image_size)
    if len(sizes) == 1:
        sizes = sizes * spatial_dims
    if len(sizes) != spatial_dims or any(isinstance(s, bool) or not isinstance(s, int) for s in sizes):
        raise DataError(f"image_size must be one int or {spatial_dims} ints for {spatial_dims}-D data, got {image_size!r}")
    if min(sizes) < 8:
        raise DataError(f"image_size must be at least 8 along every axis, got {image_size!r}")
    return tuple(sizes)


# ---------------------------------------------------------------------------- the loader
class _VolumeBatches(torch.utils.data.Dataset):
    """Worker side of :class:`VolumeLoader`: one item = one (shard of a) batch, read and transformed."""

    def __init__(self, loader: VolumeLoader, plan: list[tuple[np.ndarray, np.ndarray]], epoch: int) -> None:
        self.loader, self.plan, self.epoch = loader, plan, epoch

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> tuple[Tensor | None, Tensor | None, str]:
        files, positions = self.plan[k]
        ld = self.loader
        out, labels = [], []
        for f, pos in zip(files, positions):
            try:
                out.append(torch.from_numpy(ld.item(int(f), int(pos), self.epoch)))
            except DataError as e:
                return None, None, str(e)  # re-raised by the loader, without a worker traceback
            labels.append(int(ld.tree.labels[f]))
        x = torch.stack(out) if out else torch.zeros((0, ld.channels, *ld.size))
        return x, torch.tensor(labels, dtype=torch.int64), ""


def _identity(x: Any) -> Any:
    return x


class VolumeLoader(_Base):
    """Batches of a class-folder tree of volumes (``spatial_dims=3``: (N, C, D, H, W)) or signals
    (``spatial_dims=1``: (N, C, L)), float32 and normalised per item; labels (N,) int64. ``workers``
    processes read and transform (0: this process). Training: random crops and (volumes) flips,
    a function of (seed, epoch, position) only."""

    def __init__(self, tree: ImageTree, indices: np.ndarray, batch_size: int, *, train: bool, seed: int,
                 size: Sequence[int], spatial_dims: int, channels: int, fit: str = "resample", workers: int = 2,
                 max_values: int | None = DEFAULT_MAX_VALUES) -> None:
        super().__init__(indices, batch_size, train=train, seed=seed, mean=(0.0,) * channels, std=(1.0,) * channels)
        if workers < 0:
            raise DataError(f"workers must be >= 0, got {workers}")
        if fit not in ("resample", "crop"):
            raise DataError(f"fit must be 'resample' or 'crop', got {fit!r}")
        self.tree, self.size, self.spatial_dims, self.channels = tree, tuple(size), spatial_dims, channels
        self.fit, self.workers, self.max_values = fit, workers, max_values

    def labels(self) -> np.ndarray:
        return self.tree.labels[self.indices]

    def read(self, f: int) -> np.ndarray:
        """File ``f`` of the tree, read and checked: (C, *sides) float32."""
        name = self.tree.files[f]
        where = self.tree.location(name)
        reader = read_volume if self.spatial_dims == 3 else read_signal
        a = reader(self.tree.read(name), where, self.max_values)
        if a.shape[0] != self.channels:
            raise DataError(f"{where}: {a.shape[0]} channel(s), but the dataset's first file has {self.channels}")
        return a

    def item(self, f: int, pos: int, epoch: int) -> np.ndarray:
        """File ``f`` as the model sees it at position ``pos`` of ``epoch``."""
        a = normalise(self.read(f))
        rng = np.random.default_rng(derive_seed(self.seed, _AUGMENT, epoch, pos)) if self.train else None
        if self.spatial_dims == 1:
            return fit_signal(a, self.size[0], rng)
        return fit_volume(a, self.size, rng, self.fit)

    def batches(self, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1,
                ten_crop: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """(items (N, C, *size) float32, labels (N,) int64) for batches ``start``.. of ``epoch``."""
        if ten_crop:
            raise DataError("10-crop evaluation is for image-folder datasets (imagenet, folder), not volumes or signals")
        plan = [(idx[part], np.arange(i * self.batch_size, i * self.batch_size + len(idx))[part])
                for i, idx, part in self._plan(epoch, start, rank, world_size)]
        ds = _VolumeBatches(self, plan, epoch)
        workers = min(self.workers, len(plan))
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                             collate_fn=_identity, persistent_workers=False)
        return self._checked(loader)

    @staticmethod
    def _checked(loader: Iterable) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y, error in loader:
            if x is None:
                raise DataError(error)
            yield x, y


# ---------------------------------------------------------------------------- the dataset
@dataclass
class VolumeParts:
    """What ``build_data`` needs to make a ``Data`` of a volume or signal dataset."""

    num_classes: int
    class_names: list[str]
    channels: int
    size: tuple[int, ...]
    spatial_dims: int
    train: VolumeLoader
    val: VolumeLoader | None
    test: VolumeLoader
    source: str


def _split(n: int, k: int, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """(k indices chosen by the seed, the rest), both sorted."""
    perm = np.random.default_rng(derive_seed(seed, stream)).permutation(n)
    return np.sort(perm[:k]), np.sort(perm[k:])


def volume_parts(name: str, root: Any, *, batch_size: int, eval_batch_size: int, val_size: int | None, seed: int,
                 workers: int, image_size: int | Sequence[int] | None, val_fraction: float | None,
                 train_subset: int | None, test_subset: int | None, max_values: int | None, fit: str = "resample"
                 ) -> VolumeParts:
    """The loaders of dataset ``name`` (``volumes`` or ``signals``) at ``root``: a folder or zip with
    ``train/<class>/`` and ``val/`` or ``test/``, or one ``<class>/<file>`` tree of which ``val_fraction``
    (default 0.1, chosen by the seed) is the test split."""
    spatial_dims = VOLUME_DATASETS[name]
    suffixes = VOLUME_SUFFIXES if spatial_dims == 3 else SIGNAL_SUFFIXES
    if root is None or str(root) == "sample":
        raise DataError(f"{name} needs --data: a folder (or zip) of <class>/<file> ({', '.join(suffixes)}), "
                        "or of train/<class>/ with val/ or test/")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory")
    trees = scan_tree(root, ("train", "val", "test"), required=False, suffixes=suffixes)
    if "train" in trees:
        train_tree, test_tree = trees["train"], trees.get("test") or trees.get("val")
        if test_tree is None:
            raise DataError(f"{root}: train/ found but no val/ or test/ folder to evaluate on")
        val_tree = trees["val"] if "test" in trees and "val" in trees else None
        train_idx, test_idx = np.arange(len(train_tree)), np.arange(len(test_tree))
    elif trees:
        raise DataError(f"{root}: {', '.join(trees)}/ found but no train/ folder")
    else:
        train_tree = test_tree = scan_tree(root, None, suffixes=suffixes)[""]
        val_tree = None
        fraction = 0.1 if val_fraction is None else val_fraction
        if not 0 < fraction < 1:
            raise DataError(f"val_fraction must be in (0, 1), got {fraction}")
        k = max(1, round(fraction * len(train_tree)))
        if k >= len(train_tree):
            raise DataError(f"{root}: {len(train_tree)} file(s) cannot be split into training and test files")
        test_idx, train_idx = _split(len(train_tree), k, seed, 6)
    held = train_idx[:0]
    if val_size:
        if not 0 < val_size < len(train_idx):
            raise DataError(f"validation of {val_size} files asked from {len(train_idx)} available")
        chosen, rest = _split(len(train_idx), val_size, seed, 3)
        held, train_idx = train_idx[chosen], train_idx[rest]
    for what, k, stream in (("train_subset", train_subset, 4), ("test_subset", test_subset, 5)):
        idx = train_idx if what == "train_subset" else test_idx
        if k:
            if not 0 < k <= len(idx):
                raise DataError(f"{what} of {k} files asked from {len(idx)} available")
            idx = idx[_split(len(idx), k, seed, stream)[0]]
            if what == "train_subset":
                train_idx = idx
            else:
                test_idx = idx
    first = train_tree.files[int(train_idx[0])] if len(train_idx) else None
    if first is None:
        raise DataError(f"{root}: no training files")
    reader = read_volume if spatial_dims == 3 else read_signal
    sample = reader(train_tree.read(first), train_tree.location(first), max_values)
    default = DEFAULT_VOLUME_SIZE if spatial_dims == 3 else sample.shape[1]
    size = volume_size(image_size, spatial_dims, default)
    common = dict(seed=seed, size=size, spatial_dims=spatial_dims, channels=sample.shape[0], fit=fit, workers=workers,
                  max_values=max_values)
    train = VolumeLoader(train_tree, train_idx, batch_size, train=True, **common)
    if val_tree is not None and not val_size:
        val = VolumeLoader(val_tree, np.arange(len(val_tree)), eval_batch_size, train=False, **common)
    else:
        val = VolumeLoader(train_tree, held, eval_batch_size, train=False, **common) if val_size else None
    test = VolumeLoader(test_tree, test_idx, eval_batch_size, train=False, **common)
    names = list(train_tree.class_names)
    return VolumeParts(len(names), names, sample.shape[0], size, spatial_dims, train, val, test, str(root))
