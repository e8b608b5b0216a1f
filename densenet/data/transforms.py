"""Preprocessing: batch-wise tensor augmentation for 32x32 datasets, per-image PIL transforms for
image folders, and the seeding that makes both a pure function of (seed, epoch, position).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "derive_seed", "generator", "crop_flip_params", "pad_crop_flip", "normalize", "pad_crop_flip_on", "normalize_on",
    "random_resized_crop_box", "train_image", "eval_image", "ten_crop_image", "resize_size",
]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (e.g. ``(seed, stream, epoch, batch)``), well mixed."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(1, np.uint64)[0]) >> 1


def generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def crop_flip_params(n: int, pad: int, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random (dy, dx) offsets in [0, 2*pad] and flip flags for ``n`` images; shapes (n,), (n,), (n,) bool."""
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).numpy()
    flip = (torch.rand(n, generator=gen) < 0.5).numpy()
    return offsets[0], offsets[1], flip


def pad_crop_flip(x: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray, pad: int = 4) -> np.ndarray:
    """Zero-pad by ``pad`` pixels, crop back to (H, W) at offsets (dy, dx), mirror where ``flip``.

    ``x``: (N, C, H, W) uint8. The whole batch at once: every crop is a window of one padded buffer,
    gathered by one indexing operation. Plain numpy, single-threaded on purpose: torch's intra-op
    threads collapse (100x slower) when the cores are busy with the model or other processes.
    Returns a new (N, C, H, W) array.
    """
    x = np.asarray(x)
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), x.dtype)
    xp[:, :, pad:pad + h, pad:pad + w] = x
    windows = np.lib.stride_tricks.sliding_window_view(xp, (h, w), axis=(2, 3))  # (N, C, 2p+1, 2p+1, H, W) view
    out = windows[np.arange(n), :, np.asarray(dy), np.asarray(dx)]  # (N, C, H, W) copy
    flip = np.asarray(flip, bool)
    out[flip] = out[flip, :, :, ::-1]
    return out


def pad_crop_flip_on(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int = 4) -> Tensor:
    """:func:`pad_crop_flip` with torch on ``x``'s device (data held on a GPU): the same pixels for the
    same (dy, dx, flip). ``x``: (N, C, H, W) uint8; the offsets and flags are (N,) tensors."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = dy.to(x.device)[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = dx.to(x.device)[:, None] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flip.to(x.device)[:, None], cols.flip(1), cols)
    return xp[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]


def normalize_on(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """:func:`normalize` with torch on ``x``'s device: the same float32 numbers (one multiply, one add)."""
    scale = torch.tensor([1 / (255 * s) for s in std], dtype=torch.float32).to(x.device).view(-1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).to(x.device).view(-1, 1, 1)
    return (x * scale).add_(shift)


def normalize(x: np.ndarray | Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (N, C, H, W) or (N, K, C, H, W) pixels -> float32 tensor ``(x / 255 - mean) / std`` per channel
    (computed in numpy, single-threaded, like :func:`pad_crop_flip`)."""
    x = x.numpy() if isinstance(x, Tensor) else np.asarray(x)
    scale = np.array([1 / (255 * s) for s in std], np.float32).reshape(-1, 1, 1)
    shift = np.array([-m / s for m, s in zip(mean, std)], np.float32).reshape(-1, 1, 1)
    out = np.multiply(x, scale, dtype=np.float32)
    out += shift
    return torch.from_numpy(out)


# ------------------------------------------------------------------ per-image (image folders, ImageNet)
def resize_size(image_size: int) -> int:
    """Short side before the evaluation centre crop: 256 for 224 (the paper's ImageNet protocol)."""
    return round(image_size * 256 / 224)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom) for a ``width`` x ``height`` image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height  # fallback: centre crop with the aspect ratio clamped into ``ratio``
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _to_chw(im: Image.Image) -> np.ndarray:
    """(C, H, W), a writable copy: uint8 for RGB and L images, float32 (0-255 scale) for F images."""
    a = np.asarray(im, dtype=np.float32 if im.mode == "F" else np.uint8)
    return a[None].copy() if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))


def train_image(im: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random resized crop to ``size`` x ``size`` and a flip with probability 0.5; (C, size, size), uint8
    (float32 for mode F images; C = 1 for greyscale ones)."""
    box = random_resized_crop_box(im.width, im.height, rng)
    out = im.resize((size, size), Image.BILINEAR, box=box)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return _to_chw(out)


def _resize_short(im: Image.Image, short: int) -> Image.Image:
    w, h = im.size
    if w <= h:
        return im.resize((short, max(1, round(h * short / w))), Image.BILINEAR)
    return im.resize((max(1, round(w * short / h)), short), Image.BILINEAR)


def eval_image(im: Image.Image, size: int) -> np.ndarray:
    """Evaluation view, uint8 (3, size, size): for size <= 64 the whole image resized to size x size;
    else the short side resized to ``resize_size(size)`` (256 for 224) and the centre crop."""
    if size <= 64:
        return _to_chw(im.resize((size, size), Image.BILINEAR))
    im = _resize_short(im, resize_size(size))
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return _to_chw(im.crop((left, top, left + size, top + size)))


def ten_crop_image(im: Image.Image, size: int) -> np.ndarray:
    """The paper's 10-crop view, uint8 (10, 3, size, size): short side resized to ``resize_size(size)``,
    the four corner crops and the centre crop, then the same five mirrored."""
    im = _resize_short(im, resize_size(size))
    w, h = im.size
    corners = [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size), ((w - size) // 2, (h - size) // 2)]
    crops = [_to_chw(im.crop((l, t, l + size, t + size))) for l, t in corners]
    crops += [c[:, :, ::-1] for c in crops]
    return np.ascontiguousarray(np.stack(crops))
