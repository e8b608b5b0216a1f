"""Loaders: deterministic, resumable, shardable batches.

Every loader has ``num_batches`` (== ``len(loader)``), ``num_images`` and
``batches(epoch, start=0, rank=0, world_size=1)`` yielding ``(images, labels)``: images float32
(N, 3, H, W) normalised, labels int64 (N,). Training loaders shuffle and augment; the order and the
augmentation of batch ``i`` of epoch ``e`` depend only on ``(seed, e, i)``, so resuming with
``start=i`` gives exactly the batches an uninterrupted run sees from ``i`` on, and the union of the
``world_size`` shards of a batch is the single-process batch. Training drops the last partial batch;
evaluation keeps it and shards the images so each is seen by exactly one rank (a rank's share of
the last batch may be empty, so that every rank yields the same number of batches).

A training loader made with ``balanced=True`` draws each epoch's images class-balanced instead of
shuffling them: as many draws as images, with replacement, each image weighted by 1 / (images of its
class), like torch's ``WeightedRandomSampler``; the draws are a function of ``(seed, epoch)`` alone.
"""
from __future__ import annotations

import math
import queue
import threading
import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .folder import DEFAULT_MAX_PIXELS, ImageTree, decode_image
from .image_reading import ImageOptions, fit_image, match_channels, read_image
from .transforms import (
    crop_flip_params,
    derive_seed,
    eval_image,
    generator,
    normalize,
    normalize_on,
    pad_crop_flip,
    pad_crop_flip_on,
    ten_crop_image,
    train_image,
)

__all__ = ["ArrayLoader", "FolderLoader"]

_SHUFFLE, _AUGMENT = 1, 2  # seed streams


class _Base:
    """Batch bookkeeping shared by the loaders: ``indices`` into the data, batch size, sharding."""

    def __init__(self, indices: np.ndarray, batch_size: int, *, train: bool, seed: int,
                 mean: Sequence[float], std: Sequence[float], balanced: bool = False) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if balanced and not train:
            raise DataError("balanced sampling is for training loaders; evaluation sees every image once")
        self.indices = np.asarray(indices, np.int64)
        self.batch_size, self.train, self.seed, self.balanced = batch_size, train, seed, balanced
        self.mean, self.std = tuple(mean), tuple(std)

    def labels(self) -> np.ndarray:
        """The class index (int64) of each image this loader serves, in the order of ``indices``."""
        raise NotImplementedError

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset indices of ``epoch`` in batch order: shuffled (training), balanced draws, or as given."""
        if not self.train or not len(self.indices):
            return self.indices
        g = generator(self.seed, _SHUFFLE, epoch)
        if not self.balanced:
            return self.indices[torch.randperm(len(self.indices), generator=g).numpy()]
        labels = self.labels()
        weights = torch.from_numpy(1.0 / np.bincount(labels)[labels])
        return self.indices[torch.multinomial(weights, len(labels), replacement=True, generator=g).numpy()]

    @property
    def num_images(self) -> int:
        return len(self.indices)

    @property
    def num_batches(self) -> int:
        n = self.num_images
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.num_images:,} images in {self.num_batches:,} batches of {self.batch_size}"
                f"{', training' if self.train else ''})")

    def _plan(self, epoch: int, start: int, rank: int, world_size: int) -> Iterator[tuple[int, np.ndarray, slice]]:
        """(batch index, global batch's dataset indices, this rank's slice of it) from ``start`` on."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        if self.train and self.batch_size % world_size:
            raise DataError(f"batch_size {self.batch_size} is not divisible by world_size {world_size}")
        if not 0 <= start <= self.num_batches:
            raise DataError(f"start {start} is not in 0..{self.num_batches} (batches per epoch)")
        order = self._epoch_order(epoch)
        b = self.batch_size
        for i in range(start, self.num_batches):
            idx = order[i * b:(i + 1) * b]
            n = len(idx)
            lo, hi = (n * rank) // world_size, (n * (rank + 1)) // world_size  # equal shares for training
            yield i, idx, slice(lo, hi)


def _prefetch(it: Iterator, depth: int) -> Iterator:
    """Run ``it`` in a background thread, ``depth`` items ahead (numpy's copies release the GIL)."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        """Queue ``item`` unless the consumer has gone (never blocks past ``stop``)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in it:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()


class ArrayLoader(_Base):
    """Batches of an in-memory or memory-mapped uint8 array ``x`` (N, 3, H, W) with labels ``y`` (N,).

    ``indices``: the images of ``x`` this loader serves (a split); ``augment``: the "+" augmentation
    (4-pixel zero padding, random crop, horizontal flip with probability 0.5), applied batch-wise on
    uint8 tensors; ``prefetch``: batches prepared ahead in a background thread (0: none); ``balanced``:
    class-balanced draws instead of a shuffle (training).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, indices: np.ndarray, batch_size: int, *, train: bool,
                 augment: bool, seed: int, mean: Sequence[float], std: Sequence[float], prefetch: int = 2,
                 balanced: bool = False) -> None:
        super().__init__(indices, batch_size, train=train, seed=seed, mean=mean, std=std, balanced=balanced)
        self.x, self.y = x, np.asarray(y, np.int64)
        self.augment, self.prefetch = augment and train, prefetch
        self.on_device: tuple[Tensor, Tensor] | None = None  # (x, y) held on a device, see :meth:`to`

    def to(self, device: torch.device | str) -> ArrayLoader:
        """Hold the images (uint8) and labels on ``device`` and build batches there: gathering,
        augmentation and normalisation run on the device (the same numbers as on the CPU), so a GPU
        never waits for the host. Returns the loader."""
        self.on_device = (torch.from_numpy(np.ascontiguousarray(self.x)).to(device),
                          torch.from_numpy(self.y).to(device))
        return self

    def labels(self) -> np.ndarray:
        return self.y[self.indices]

    def _batches(self, epoch: int, start: int, rank: int, world_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i, idx, part in self._plan(epoch, start, rank, world_size):
            mine = idx[part]
            params = None
            if self.augment:  # parameters drawn for the global batch, so shards and resumes agree
                dy, dx, flip = crop_flip_params(len(idx), 4, generator(self.seed, _AUGMENT, epoch, i))
                params = dy[part], dx[part], flip[part]
            if self.on_device is not None:
                xs, ys = self.on_device
                rows = torch.from_numpy(mine).to(xs.device)
                x = xs[rows] if params is None else pad_crop_flip_on(xs[rows], *map(torch.from_numpy, params))
                yield normalize_on(x, self.mean, self.std), ys[rows]
                continue
            x = self.x[mine]  # (n, 3, 32, 32) uint8 copy, from memory or the memory-mapped cache
            if params is not None:
                x = pad_crop_flip(x, *params)
            yield normalize(x, self.mean, self.std), torch.from_numpy(self.y[mine])

    def batches(self, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1,
                ten_crop: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """(images (N, 3, 32, 32) float32, labels (N,) int64) for batches ``start``.. of ``epoch``."""
        if ten_crop:
            raise DataError("10-crop evaluation is for image-folder datasets (imagenet, folder), not 32x32 arrays")
        batches = self._batches(epoch, start, rank, world_size)
        return batches if self.on_device is not None else _prefetch(batches, self.prefetch)


class _FolderBatches(torch.utils.data.Dataset):
    """Worker side of :class:`FolderLoader`: one item = one (shard of a) batch, decoded and transformed."""

    def __init__(self, tree: ImageTree, plan: list[tuple[np.ndarray, np.ndarray]], mode: str, size: int,
                 seed: int, epoch: int, skip_bad: bool, max_pixels: int | None, options: ImageOptions | None) -> None:
        self.tree, self.plan, self.mode, self.size = tree, plan, mode, size
        self.seed, self.epoch, self.skip_bad, self.max_pixels, self.options = seed, epoch, skip_bad, max_pixels, options

    def __len__(self) -> int:
        return len(self.plan)

    def _decode(self, name: str):  # noqa: ANN202 - a Pillow image
        data, where = self.tree.read(name), self.tree.location(name)
        if self.options is None:
            return decode_image(data, where, self.max_pixels)
        return fit_image(read_image(data, where, self.options, self.max_pixels), self.options)

    def __getitem__(self, k: int) -> tuple[Tensor | None, Tensor | None, list[str]]:
        files, positions = self.plan[k]
        channels = 3 if self.options is None else self.options.channels
        shape = (10, channels, self.size, self.size) if self.mode == "ten_crop" else (channels, self.size, self.size)
        out, labels, bad = [], [], []
        for f, pos in zip(files, positions):
            name = self.tree.files[f]
            try:
                im = self._decode(name)
            except DataError as e:
                if not self.skip_bad:
                    return None, None, [str(e)]  # re-raised by the loader, without a worker traceback
                bad.append(self.tree.location(name))
                continue
            if self.mode == "train" and self.options is not None:  # labels: the whole image, mirrored or not
                a = eval_image(im, self.size)
                if np.random.default_rng(derive_seed(self.seed, _AUGMENT, self.epoch, pos)).random() < 0.5:
                    a = np.ascontiguousarray(a[:, :, ::-1])
            elif self.mode == "train":  # per-image randomness: a function of (seed, epoch, position in epoch)
                a = train_image(im, self.size, np.random.default_rng(derive_seed(self.seed, _AUGMENT, self.epoch, pos)))
            elif self.mode == "ten_crop":
                a = ten_crop_image(im, self.size)
            else:
                a = eval_image(im, self.size)
            out.append(torch.from_numpy(a if self.options is None else match_channels(a, channels)))
            labels.append(self.tree.labels[f] if self.tree.targets is None else self.tree.targets[f])
        dtype = torch.uint8 if self.options is None else torch.float32
        x = torch.stack(out) if out else torch.zeros((0, *shape), dtype=dtype)
        if self.tree.targets is None:
            return x, torch.tensor(np.array(labels, np.int64)), bad
        return x, torch.from_numpy(np.array(labels, np.float32).reshape(-1, self.tree.targets.shape[1])), bad


def _identity(x):
    return x


class FolderLoader(_Base):
    """Batches of an :class:`ImageTree` decoded by ``workers`` processes (0: in this process).

    Training: random resized crop to ``image_size`` and a flip (per image, seeded by position); with
    ``image_options`` (label files: several findings per image, which a crop could cut out) the
    evaluation view and a flip, as CheXNet trains; evaluation: resize and centre crop (see
    :func:`transforms.eval_image`), or with
    ``batches(..., ten_crop=True)`` the paper's 10-crop view, images shaped (N, 10, 3, S, S).
    Undecodable images raise :class:`DataError`, or with ``skip_bad_images`` are dropped from their
    batch (which is then smaller) and listed in ``skipped`` with a warning. ``balanced``:
    class-balanced draws instead of a shuffle (training).
    """

    def __init__(self, tree: ImageTree, indices: np.ndarray, batch_size: int, *, train: bool, seed: int,
                 image_size: int, mean: Sequence[float], std: Sequence[float], workers: int = 2,
                 skip_bad_images: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS, balanced: bool = False,
                 image_options: ImageOptions | None = None) -> None:
        super().__init__(indices, batch_size, train=train, seed=seed, mean=mean, std=std, balanced=balanced)
        if workers < 0:
            raise DataError(f"workers must be >= 0, got {workers}")
        if balanced and tree.targets is not None:
            raise DataError("class-balanced sampling needs one class per image; a multi-label file has several: "
                            "leave out --balanced-sampler (--pos-weight auto weighs rare labels instead)")
        self.tree, self.image_size, self.workers, self.image_options = tree, image_size, workers, image_options
        self.skip_bad_images, self.max_pixels = skip_bad_images, max_pixels
        self.skipped: set[str] = set()

    def labels(self) -> np.ndarray:
        return self.tree.labels[self.indices]

    def batches(self, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1,
                ten_crop: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """(images float32 (N, C, S, S), or (N, 10, C, S, S) with ``ten_crop``; labels (N,) int64, or for a
        multi-label tree (``tree.targets``) targets (N, L) float32: 1, 0, NaN for an ignored label)."""
        if ten_crop and self.train:
            raise DataError("ten_crop is an evaluation view: use it on data.test or data.val")
        plan = [(idx[part], np.arange(i * self.batch_size, i * self.batch_size + len(idx))[part])
                for i, idx, part in self._plan(epoch, start, rank, world_size)]
        mode = "train" if self.train else ("ten_crop" if ten_crop else "eval")
        ds = _FolderBatches(self.tree, plan, mode, self.image_size, self.seed, epoch, self.skip_bad_images, self.max_pixels,
                            self.image_options)
        workers = min(self.workers, len(plan))
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                             collate_fn=_identity, persistent_workers=False)
        return self._normalised(loader)

    def _normalised(self, loader: Iterable) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y, bad in loader:
            if x is None:
                raise DataError(bad[0])
            if bad:
                new = set(bad) - self.skipped
                if new:
                    self.skipped |= new
                    warnings.warn(f"skipped {len(new)} undecodable image(s) ({len(self.skipped)} so far), "
                                  f"e.g. {sorted(new)[0]}", stacklevel=2)
            yield normalize(x, self.mean, self.std), y
