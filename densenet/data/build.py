"""``build_data``: the paper's datasets and preprocessing, selected by name."""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cache import cache_path, load_arrays, save_arrays
from .cifar import LAYOUTS, find_cifar, read_cifar, read_image_tree_32
from .download import RESOURCES, missing_message
from .download import download as download_files
from .errors import DataError, DataNotFound
from .folder import DEFAULT_MAX_PIXELS, ImageTree, scan_tree, typical_size
from .image_reading import ImageOptions
from .label_file import read_label_file, split_by_group
from .loader import ArrayLoader, FolderLoader
from .svhn import find_svhn, read_svhn
from .transforms import derive_seed
from .volumes import DEFAULT_MAX_VALUES, VOLUME_DATASETS, VolumeLoader, volume_parts

__all__ = ["DATASETS", "Data", "build_data", "SAMPLE_PATH", "IMAGENET_MEAN", "IMAGENET_STD", "channel_stats"]

log = logging.getLogger("densenet.data")

DATASETS = ("cifar10", "cifar10+", "cifar100", "cifar100+", "svhn", "imagenet", "folder", "csv", *VOLUME_DATASETS)
SAMPLE_PATH = Path(__file__).resolve().parent.parent / "assets" / "cifar10-sample.zip"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.449,), (0.226,)  # one channel: the means of ImageNet's three
_VAL, _TRAIN_SUBSET, _TEST_SUBSET, _FOLDER_SPLIT = 3, 4, 5, 6  # seed streams


@dataclass
class Data:
    """What :func:`build_data` returns: three loaders and the facts a model and a report need."""

    name: str
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]  # per-channel normalisation on the 0-1 scale
    std: tuple[float, float, float]
    image_size: int | tuple[int, ...]  # one side; volumes: (D, H, W); signals: the length
    train: ArrayLoader | FolderLoader | VolumeLoader
    val: ArrayLoader | FolderLoader | VolumeLoader | None
    test: ArrayLoader | FolderLoader | VolumeLoader
    source: str = ""  # where the data came from (file, or cache file)
    skipped: list[str] = field(default_factory=list)  # images left out by skip_bad_images at import
    class_counts: list[int] = field(default_factory=list)  # training images per class
    typical_size: tuple[int, int] | None = None  # image folders: median (width, height) of a sample of training images
    ignored: list[str] = field(default_factory=list)  # image folders: files left out, their suffix not an image's
    spatial_dims: int = 2  # 3 for volumes, 1 for signals
    in_channels: int = 3
    multilabel: bool = False  # csv label files: targets (N, L) float32 with NaN for ignored labels, not class indices

    def __repr__(self) -> str:
        """One line (a thousand class names would fill the terminal); every field is an attribute."""
        sides = self.image_size if isinstance(self.image_size, (tuple, list)) else (self.image_size,) * self.spatial_dims
        splits = [f"{name} {loader.num_images:,}" for name, loader in
                  (("train", self.train), ("val", self.val), ("test", self.test)) if loader is not None]
        return (f"Data({self.name}: {self.num_classes} classes, {self.in_channels}x{'x'.join(map(str, sides))}, "
                f"{' / '.join(splits)} images" + (f", from {self.source}" if self.source else "") + ")")

    def model_args(self) -> dict[str, int]:
        """What a model for this data needs besides the class count: nothing for images (the models'
        defaults), ``spatial_dims`` and ``in_channels`` for volumes and signals."""
        if self.spatial_dims == 2:
            return {} if self.in_channels == 3 else {"in_channels": self.in_channels}
        return {"spatial_dims": self.spatial_dims, "in_channels": self.in_channels}

    def to(self, device: str | torch.device) -> Data:
        """Hold the array datasets (CIFAR, SVHN) on ``device`` as uint8, batches built there (see
        :meth:`ArrayLoader.to`); image folders are decoded on the host as before. Returns the data."""
        for loader in (self.train, self.val, self.test):
            if isinstance(loader, ArrayLoader):
                loader.to(device)
        return self


def channel_stats(x: np.ndarray, indices: np.ndarray, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0-1 scale) of the uint8 images ``x[indices]``, x shaped (N, C, H, W)."""
    c = x.shape[1]
    s, s2, n = np.zeros(c), np.zeros(c), 0
    idx = np.sort(indices)
    whole = len(idx) == len(x) and (len(idx) == 0 or (idx[0] == 0 and idx[-1] == len(x) - 1))
    for i in range(0, len(idx), chunk):
        part = np.asarray(x[i:i + chunk] if whole else x[idx[i:i + chunk]], np.float64).reshape(-1, c, x.shape[2] * x.shape[3])
        s += part.sum((0, 2))
        s2 += np.einsum("ncp,ncp->c", part, part)
        n += part.shape[0] * part.shape[2]
    if n == 0:
        raise DataError("no training images to compute normalisation statistics from")
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0))
    return tuple(float(v) for v in mean / 255), tuple(float(max(v, 1e-3)) for v in std / 255)


def _pick(n_or_idx: np.ndarray, k: int | None, seed: int, stream: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split sorted ``indices`` into (k chosen by the seed, the rest), both sorted."""
    idx = n_or_idx
    if not k:
        return idx[:0], idx
    if not 0 < k < len(idx) + (what != "validation"):
        raise DataError(f"{what} of {k} images asked from {len(idx)} available")
    perm = np.random.default_rng(derive_seed(seed, stream)).permutation(len(idx))
    return np.sort(idx[perm[:k]]), np.sort(idx[perm[k:]])


@functools.lru_cache(maxsize=2)
def _sample_arrays(path: str) -> dict[str, np.ndarray]:
    return read_image_tree_32(Path(path))


def _array_source(base: str, root, *, cache_dir, skip_bad_images: bool, max_pixels, download: bool) -> tuple[dict, str]:
    """Decoded arrays of cifar10/cifar100/svhn (from the cache when it is current) and their source."""
    if root is None or str(root) == "sample":
        if base != "cifar10":
            raise DataError(f"the bundled sample is CIFAR-10 only; {base} needs root: {missing_message(base, '<root>')}")
        if not SAMPLE_PATH.is_file():
            raise DataError(f"the bundled sample {SAMPLE_PATH} is missing from this installation")
        return _sample_arrays(str(SAMPLE_PATH)), f"bundled sample {SAMPLE_PATH.name}"
    root = Path(root).expanduser()
    if download and base in RESOURCES and not root.is_file():
        download_files(base, root)
    try:
        if base == "svhn":
            files = find_svhn(root)
            sources, form, label = list(files.values()), "mat", str(root)
        else:
            form, path = find_cifar(base, root)
            label = str(path)
            if form in ("binary", "python"):
                folder, train, test, meta, _ = LAYOUTS[base][form]
                sources = [path / f for f in train + test + meta if (path / f).is_file()]
            elif form == "images" and path.is_dir():
                sources = [Path(d) / f for d, _, fs in os.walk(path) for f in fs]
            else:
                sources = [path]
    except DataNotFound as e:
        raise DataNotFound(f"{e}. {missing_message(base, root)}") from None
    kind = f"{base}-{form}" + ("-skipbad" if skip_bad_images and form == "images" else "")
    cpath = cache_path(kind, sources, cache_dir)
    if cpath.is_file():
        try:
            return load_arrays(cpath), f"{label} (cache {cpath})"
        except DataError as e:
            log.warning("%s; importing again", e)
    log.info("importing %s into %s (once)", label, cpath)
    if base == "svhn":
        arrays = read_svhn(files)
    else:
        opts = {"skip_bad_images": skip_bad_images, "max_pixels": max_pixels} if form == "images" else {}
        arrays = read_cifar(base, form, path, **opts)
    try:
        save_arrays(cpath, arrays)
        return load_arrays(cpath), f"{label} (cache {cpath})"
    except OSError as e:
        log.warning("cannot write the cache %s (%s); using the data in memory", cpath, e)
        return arrays, label


def _folder_trees(name: str, root, val_fraction: float | None, seed: int
                  ) -> tuple[ImageTree, ImageTree | None, ImageTree, np.ndarray | None, np.ndarray | None]:
    """(train tree, val tree or None, test tree, train indices, test indices) of an image-folder dataset."""
    if root is None or str(root) == "sample":
        need = (missing_message(name, "<root>") if name == "imagenet" else
                "a folder or zip of train/<class>/<image> (and val/ or test/), or of <class>/<image>")
        raise DataError(f"{name} needs root: {need}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory. " + (missing_message(name, root) if name == "imagenet" else ""))
    if name == "imagenet":
        trees = scan_tree(root, ("train", "val"))
        if set(trees) != {"train", "val"}:
            raise DataError(f"{root}: ImageNet needs train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (validation images "
                            f"sorted into class folders); found only {', '.join(trees)}/")
        return trees["train"], None, trees["val"], None, None
    trees = scan_tree(root, ("train", "val", "test"), required=False)
    if "train" in trees:
        test = trees.get("test") or trees.get("val")
        if test is None:
            raise DataError(f"{root}: train/ found but no val/ or test/ folder to evaluate on")
        val = trees["val"] if "test" in trees and "val" in trees else None
        return trees["train"], val, test, None, None
    if trees:
        raise DataError(f"{root}: {', '.join(trees)}/ found but no train/ folder")
    tree = scan_tree(root, None)[""]
    fraction = 0.1 if val_fraction is None else val_fraction
    if not 0 < fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {fraction}")
    train_idx, test_idx = stratified_split(tree.labels, tree.class_names, fraction, seed, str(root))
    return tree, None, tree, train_idx, test_idx


def stratified_split(labels: np.ndarray, class_names: list[str], fraction: float, seed: int, where: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), both sorted: of each class, ``round(fraction * n)`` images (at
    least 1, at most n - 1) held out for testing, chosen by ``seed``. A class with fewer than 2
    images cannot be split: :class:`DataError` naming each such class and what it needs."""
    counts = np.bincount(labels, minlength=len(class_names)).tolist()
    short = [f"{name} has {n} image{'s' * (n != 1)}, needs {2 - n} more" for name, n in zip(class_names, counts) if n < 2]
    if short:
        raise DataError(f"{where}: too few images to hold out a test split ({fraction:.0%} of each class, at least 1 to "
                        f"test and 1 to train on): {'; '.join(short[:10])}{' ...' if len(short) > 10 else ''}. Add images, "
                        "or give separate train/<class>/ and test/<class>/ folders")
    rng = np.random.default_rng(derive_seed(seed, _FOLDER_SPLIT))
    train, test = [], []
    for c, n in enumerate(counts):
        members = np.flatnonzero(labels == c)
        k = min(max(1, round(fraction * n)), n - 1)
        perm = rng.permutation(n)
        test.append(members[perm[:k]])
        train.append(members[perm[k:]])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def build_data(name: str, root: str | os.PathLike | None = None, *, batch_size: int = 64,
               eval_batch_size: int | None = None, val_size: int | None = None, seed: int = 0, workers: int = 2,
               cache_dir: str | os.PathLike | None = None, skip_bad_images: bool = False,
               image_size: int | tuple[int, ...] | None = None, val_fraction: float | None = None,
               train_subset: int | None = None,
               test_subset: int | None = None, coarse_labels: bool = False, download: bool = False,
               max_image_pixels: int | None = DEFAULT_MAX_PIXELS, prefetch: int = 2, balanced: bool = False,
               image_root: str | os.PathLike | None = None, uncertain: str = "zeros", group_column: str | None = None,
               image_options: ImageOptions | None = None) -> Data:
    """Loaders for dataset ``name`` (one of :data:`DATASETS`) read from ``root``.

    ``root``: a directory or archive. cifar10/cifar100: the official binary or python release
    (``.tar.gz`` or extracted), or an image-folder tree / zip with ``train/`` and ``test/`` (e.g.
    ``cifar10-jpeg.zip``); None or ``"sample"``: the bundled CIFAR-10 sample (1,000 training and 200
    test images). svhn: a directory with ``train_32x32.mat``, ``extra_32x32.mat``, ``test_32x32.mat``.
    imagenet: ``train/<class>/`` and ``val/<class>/``. folder: ``train/`` with ``val/`` and/or ``test/``
    (the test loader reads ``test/``, else ``val/``), or one ``<class>/<image>`` tree of which
    ``val_fraction`` of each class (default 0.1, chosen by the seed) is the test split.

    Preprocessing as in the paper: "+" adds 4-pixel zero padding, random 32x32 crop and horizontal
    flip; CIFAR is normalised with the training images' per-channel mean/std; SVHN trains on
    train + extra with pixels / 255; imagenet/folder train on a random resized crop of ``image_size``
    (default 224; ``densenet train`` passes the model's native size) with flip and evaluate the centre
    crop after resizing to 256 (for 224; the whole image resized for sizes up to 64); pass
    ``ten_crop=True`` to ``data.test.batches`` for the 10-crop view, images (N, 10, 3, S, S).
    volumes / signals: a folder or zip of ``<class>/<file>`` (or ``train/<class>/`` with ``val/`` or
    ``test/``) of NIfTI or ``.npy`` volumes (3-D) / ``.npy`` signals (channels, length), normalised per
    file and fitted to ``image_size`` (one side or three; default 64, for signals the first file's
    length); see :mod:`densenet.data.volumes`; ``max_image_pixels`` then limits the values per file
    (default 2**28).

    ``val_size``: training images held out for validation (paper: 5,000 CIFAR, 6,000 SVHN), chosen by
    ``seed``; ``train_subset``/``test_subset``: use only this many images (chosen by ``seed``);
    ``workers``: decoding processes for image folders; ``cache_dir``: where decoded CIFAR/SVHN
    arrays are kept (default ``$DENSENET_CACHE`` or ``~/.cache/densenet``); ``skip_bad_images``: leave
    undecodable images out (counted) instead of failing; ``coarse_labels``: CIFAR-100's 20
    superclasses; ``download``: fetch missing official files (MD5-checked); ``prefetch``: batches of
    32x32 datasets prepared ahead in a thread; ``balanced``: the training loader draws class-balanced
    batches (see :mod:`densenet.data.loader`). Every bad input raises :class:`DataError`.

    csv: ``root`` is a label file (:mod:`densenet.data.label_file`: CheXpert's or ChestX-ray14's
    layout) naming images relative to its folder or to ``image_root``; ``uncertain`` is the policy
    for -1 labels, ``group_column`` the patient column; the file's split column, else a seeded split
    by group (80/10/10). Images are read at full depth (:mod:`densenet.data.image_reading`;
    ``image_options``: channels, fit, DICOM window); the loaders yield targets (N, L) float32.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
        raise DataError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
    eval_bs = eval_batch_size or batch_size
    base = name.rstrip("+")
    if name in VOLUME_DATASETS:
        if balanced:
            raise DataError(f"class-balanced sampling is for image datasets, not {name}; leave out --balanced-sampler")
        p = volume_parts(name, root, batch_size=batch_size, eval_batch_size=eval_bs, val_size=val_size, seed=seed,
                         workers=workers, image_size=image_size, val_fraction=val_fraction, train_subset=train_subset,
                         test_subset=test_subset,
                         max_values=DEFAULT_MAX_VALUES if max_image_pixels == DEFAULT_MAX_PIXELS else max_image_pixels)
        zeros, ones = (0.0,) * p.channels, (1.0,) * p.channels  # normalised per file
        size = p.size if p.spatial_dims == 3 else p.size[0]
        return Data(name, p.num_classes, p.class_names, zeros, ones, size, p.train, p.val, p.test, p.source,
                    spatial_dims=p.spatial_dims, in_channels=p.channels,
                    class_counts=_class_counts(p.train, p.num_classes))
    if name == "csv":
        return _label_file_data(root, image_root, uncertain, group_column, image_options or ImageOptions(),
                                balanced=balanced, batch_size=batch_size, eval_batch_size=eval_bs, seed=seed, workers=workers,
                                skip_bad_images=skip_bad_images, image_size=image_size or 224, train_subset=train_subset,
                                test_subset=test_subset, max_pixels=max_image_pixels)
    if base in ("imagenet", "folder"):
        size = image_size or 224
        if size < 8:
            raise DataError(f"image_size must be at least 8, got {size}")
        train_tree, val_tree, test_tree, train_idx, test_idx = _folder_trees(name, root, val_fraction, seed)
        train_idx = np.arange(len(train_tree)) if train_idx is None else train_idx
        test_idx = np.arange(len(test_tree)) if test_idx is None else test_idx
        held, train_idx = _pick(train_idx, val_size, seed, _VAL, "validation")
        train_idx = _pick(train_idx, train_subset, seed, _TRAIN_SUBSET, "train_subset")[0] if train_subset else train_idx
        test_idx = _pick(test_idx, test_subset, seed, _TEST_SUBSET, "test_subset")[0] if test_subset else test_idx
        common = dict(seed=seed, image_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=workers,
                      skip_bad_images=skip_bad_images, max_pixels=max_image_pixels)
        train = FolderLoader(train_tree, train_idx, batch_size, train=True, balanced=balanced, **common)
        if val_tree is not None and not val_size:
            val = FolderLoader(val_tree, np.arange(len(val_tree)), eval_bs, train=False, **common)
        else:
            val = FolderLoader(train_tree, held, eval_bs, train=False, **common) if val_size else None
        test = FolderLoader(test_tree, test_idx, eval_bs, train=False, **common)
        names = list(train_tree.class_names)
        ignored = sorted(set(train_tree.ignored) | set(test_tree.ignored) | set(val_tree.ignored if val_tree else ()))
        return Data(name, len(names), names, IMAGENET_MEAN, IMAGENET_STD, size, train, val, test, str(root),
                    class_counts=_class_counts(train, len(names)),
                    typical_size=typical_size(train_tree, train_idx, max_pixels=max_image_pixels), ignored=ignored)

    if image_size not in (None, 32):
        raise DataError(f"{name} images are 32x32; image_size {image_size} is not available")
    if coarse_labels and base != "cifar100":
        raise DataError("coarse_labels is for cifar100 only")
    arrays, source = _array_source(base, root, cache_dir=cache_dir, skip_bad_images=skip_bad_images,
                                   max_pixels=max_image_pixels, download=download)
    names = [str(n) for n in arrays["coarse_names" if coarse_labels else "class_names"]]
    ykey = "_coarse" if coarse_labels else "_y"
    train_x, train_y, test_x, test_y = arrays["train_x"], arrays["train" + ykey], arrays["test_x"], arrays["test" + ykey]
    held, train_idx = _pick(np.arange(len(train_x)), val_size, seed, _VAL, "validation")
    train_idx = _pick(train_idx, train_subset, seed, _TRAIN_SUBSET, "train_subset")[0] if train_subset else train_idx
    test_idx = np.arange(len(test_x))
    test_idx = _pick(test_idx, test_subset, seed, _TEST_SUBSET, "test_subset")[0] if test_subset else test_idx
    if base == "svhn":
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # pixels / 255 only
    else:
        mean, std = channel_stats(train_x, train_idx)
    augment = name.endswith("+")
    common = dict(seed=seed, mean=mean, std=std, prefetch=prefetch)
    train = ArrayLoader(train_x, train_y, train_idx, batch_size, train=True, augment=augment, balanced=balanced, **common)
    val = ArrayLoader(train_x, train_y, held, eval_bs, train=False, augment=False, **common) if val_size else None
    test = ArrayLoader(test_x, test_y, test_idx, eval_bs, train=False, augment=False, **common)
    skipped = [str(s) for s in arrays.get("skipped", [])]
    if skipped:
        log.warning("%d undecodable image(s) were skipped at import, e.g. %s", len(skipped), skipped[0])
    return Data(name, len(names), names, mean, std, 32, train, val, test, source, skipped,
                class_counts=_class_counts(train, len(names)))


def _class_counts(loader: ArrayLoader | FolderLoader | VolumeLoader, num_classes: int) -> list[int]:
    return np.bincount(loader.labels(), minlength=num_classes).tolist()


def _label_file_data(root, image_root, uncertain: str, group_column: str | None, options: ImageOptions, *,
                     balanced: bool, batch_size: int, eval_batch_size: int, seed: int, workers: int, skip_bad_images: bool,
                     image_size: int, train_subset: int | None, test_subset: int | None, max_pixels: int | None) -> Data:
    """The ``csv`` dataset: a label file's rows split into train / val / test (see :func:`build_data`)."""
    if root is None or str(root) == "sample":
        raise DataError("csv needs root: a label file (--data labels.csv) naming images relative to its folder or to "
                        "--image-root")
    if image_size < 8:
        raise DataError(f"image_size must be at least 8, got {image_size}")
    table = read_label_file(Path(root).expanduser(), image_root, uncertain, group_column=group_column,
                            skip_bad=skip_bad_images)
    if table.skipped:
        log.warning("%d row(s) of %s left out, their images missing: %s", len(table.skipped), table.source,
                    "; ".join(table.skipped[:3]) + (" ..." if len(table.skipped) > 3 else ""))
    parts = split_by_group(table, seed=seed)
    empty = [n for n in ("train", "test") if not len(parts[n])]
    if empty:
        raise DataError(f"{table.source}: no rows for the {' and '.join(empty)} split; the split column needs train and "
                        "test rows (val optional), or leave it out for a seeded split")
    tree = ImageTree(Path("/"), "", list(table.labels), [str(p.absolute()) for p in table.paths],
                     np.zeros(len(table), np.int64), targets=table.targets)
    train_idx = _pick(parts["train"], train_subset, seed, _TRAIN_SUBSET, "train_subset")[0] if train_subset else parts["train"]
    test_idx = _pick(parts["test"], test_subset, seed, _TEST_SUBSET, "test_subset")[0] if test_subset else parts["test"]
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if options.channels == 3 else (GREY_MEAN, GREY_STD)
    common = dict(seed=seed, image_size=image_size, mean=mean, std=std, workers=workers, skip_bad_images=skip_bad_images,
                  max_pixels=max_pixels, image_options=options)
    train = FolderLoader(tree, train_idx, batch_size, train=True, balanced=balanced, **common)  # refused: several labels
    val = FolderLoader(tree, parts["val"], eval_batch_size, train=False, **common) if len(parts["val"]) else None
    test = FolderLoader(tree, test_idx, eval_batch_size, train=False, **common)
    positives = np.nan_to_num(table.targets[train_idx], nan=0.0).sum(0)
    return Data("csv", len(table.labels), list(table.labels), mean, std, image_size, train, val, test, str(table.source),
                skipped=list(table.skipped), class_counts=[int(v) for v in positives], in_channels=options.channels,
                multilabel=True)
