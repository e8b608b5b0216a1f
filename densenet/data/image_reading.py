"""Images as they come (issue 25): greyscale and 16-bit PNG/TIFF kept at full depth, DICOM, one or
three channels, and a resize that keeps the aspect ratio.

:func:`read_image` returns a Pillow image in one of three modes: ``RGB`` (8-bit colour), ``L`` (8-bit
greyscale) or ``F`` (float32 greyscale on the same 0-255 scale, for 16-bit, floating-point and DICOM
images: ``v / 257`` for 16-bit values, so two 16-bit images that differ only in their low 8 bits give
different inputs). The transforms of :mod:`.transforms` work on all three; :func:`match_channels`
then gives the model's channel count.

    options = ImageOptions(channels=1, fit="pad")
    im = read_image(data, "xray.png", options)            # mode "F" for a 16-bit PNG
    a = match_channels(eval_image(fit_image(im, options), 224), options.channels)   # float32 (1, 224, 224)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .dicom import DICOM_SUFFIXES, is_dicom, read_dicom
from .errors import DataError
from .folder import DEFAULT_MAX_PIXELS, decode_image, open_image
from .transforms import eval_image

__all__ = ["FITS", "ImageOptions", "read_image", "fit_image", "match_channels", "eval_view"]

#: how an image that is not square becomes square: ``crop`` (the short side resized, the centre kept:
#: the default, torchvision's) or ``pad`` (the long side resized, black bands added: nothing cut off)
FITS = ("crop", "pad")
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@dataclass(frozen=True)
class ImageOptions:
    """How label-file images are read: ``channels`` 1 or 3; ``fit`` one of :data:`FITS`; ``window``:
    DICOM files use their VOI window (WindowCenter/WindowWidth) when they have one."""

    channels: int = 3
    fit: str = "crop"
    window: bool = False

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise DataError(f"in_channels must be 1 (greyscale) or 3 (RGB), got {self.channels}")
        if self.fit not in FITS:
            raise DataError(f"fit must be one of {', '.join(FITS)}, got {self.fit!r}")


def read_image(data: bytes, name: str, options: ImageOptions = ImageOptions(),
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image in ``data`` (any format Pillow reads, or DICOM) as an ``RGB``, ``L`` or ``F`` image
    (see the module docstring); :class:`DataError` naming ``name`` when it cannot be read."""
    if is_dicom(data) or name.lower().endswith(DICOM_SUFFIXES):
        a = read_dicom(data, name, window=options.window)
        if max_pixels is not None and a.shape[0] * a.shape[1] > max_pixels:
            raise DataError(f"{name}: {a.shape[1]}x{a.shape[0]} image exceeds the limit of {max_pixels:,} pixels")
        if a.ndim == 3:
            return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
        return Image.fromarray(np.ascontiguousarray(a, np.float32), "F")
    try:
        im = open_image(data, max_pixels)
        mode = im.mode
    except DataError as e:
        raise DataError(f"{name}: {e}") from None
    except Exception:  # noqa: BLE001 - decode_image names what is wrong with the file
        mode = ""
    if mode not in _HIGH_DEPTH:
        im = decode_image(data, name, max_pixels)  # RGB, every 8-bit mode converted
        return im.convert("L") if mode in ("L", "1", "LA") else im
    try:
        im.load()
        a = np.asarray(im, dtype=np.float64)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DataError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise DataError(f"{name}: {bad} NaN or infinite pixel value(s) in a floating-point image; refusing to use it")
    if mode.startswith("I;16") or a.max() > 255:
        a = a / 257.0  # 0..65535 -> 0..255, every 16-bit step kept
    return Image.fromarray(np.clip(a, 0, 255).astype(np.float32), "F")


def fit_image(im: Image.Image, options: ImageOptions) -> Image.Image:
    """``im`` made square by black bands on its short side when ``options.fit`` is ``pad`` (the
    transforms then resize it whole); unchanged for ``crop``, where the transforms keep the centre."""
    if options.fit == "crop" or im.width == im.height:
        return im
    side = max(im.size)
    out = Image.new(im.mode, (side, side))
    out.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return out


def match_channels(a: np.ndarray, channels: int) -> np.ndarray:
    """A (C, H, W) or (K, C, H, W) array from the transforms as float32 with ``channels`` channels:
    greyscale repeated into RGB, RGB to greyscale by ITU-R 601 luma (Pillow's ``convert("L")``)."""
    axis = a.ndim - 3
    a = a.astype(np.float32, copy=False)
    have = a.shape[axis]
    if have == channels:
        return a
    if channels == 3:
        return np.repeat(a, 3, axis=axis)
    luma = np.array([0.299, 0.587, 0.114], np.float32).reshape((3, 1, 1))
    return (a * luma).sum(axis=axis, keepdims=True, dtype=np.float32)


def eval_view(data: bytes, name: str, size: int, options: ImageOptions | None = None,
              max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The evaluation view (:func:`.transforms.eval_image`) of the image in ``data``: uint8 (3, size, size)
    read as image folders are (``options`` None), else float32 (C, size, size) read as a label-file
    model reads it (full depth, DICOM, ``options.fit``, ``options.channels``)."""
    if options is None:
        return eval_image(decode_image(data, name, max_pixels), size)
    return match_channels(eval_image(fit_image(read_image(data, name, options, max_pixels), options), size), options.channels)
