"""DICOM images (``.dcm``): one frame as float32 on the 0-255 scale, at full depth (not cut to 8 bits).

Needs pydicom (``pip install "densenet[dicom]"``); compressed files (JPEG, JPEG-LS, JPEG 2000) also
need a decoder plugin, as pydicom's documentation lists. The steps for MONOCHROME1/MONOCHROME2:

1. the modality LUT (RescaleSlope/RescaleIntercept, or a Modality LUT): CT values become Hounsfield units;
2. with ``window=True`` and a VOI window in the file (WindowCenter/WindowWidth, the first if several,
   or a VOI LUT): the window, whose output range is mapped to 0-255 (values outside it clip to 0 or
   255); without one, or with ``window=False``: the image's minimum maps to 0 and its maximum to 255
   (a constant image gives zeros);
3. MONOCHROME1 is inverted (``255 - v``) so that high values are bright, as in MONOCHROME2.

RGB images are scaled by their bit depth (an 8-bit RGB file keeps its values, as the same picture
saved as PNG would); the window does not apply to them.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from ..errors import MissingDependency
from .errors import DataError

__all__ = ["DICOM_SUFFIXES", "is_dicom", "read_dicom"]

#: file name suffixes read as DICOM whatever their first bytes
DICOM_SUFFIXES = (".dcm", ".dicom")
_KINDS = ("MONOCHROME1", "MONOCHROME2", "RGB")
_PIXELS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DECODERS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (JPEG, JPEG-LS, JPEG 2000) or pip install python-gdcm"


def is_dicom(data: bytes) -> bool:
    """True when ``data`` is a DICOM file: a 128-byte preamble, then ``DICM``."""
    return data[128:132] == b"DICM"


def _pydicom(name: str) -> tuple[Any, Any, Any]:
    """(pydicom, apply_modality_lut, apply_voi_lut), or :class:`MissingDependency` saying how to install pydicom."""
    try:
        import pydicom  # an optional dependency: only DICOM files need it
    except ImportError:
        raise MissingDependency(f'{name}: reading DICOM files needs pydicom: pip install "densenet[dicom]" '
                                "(or pip install pydicom)") from None
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut  # pydicom >= 3
    except ImportError:
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut  # pydicom 2.4
    return pydicom, apply_modality_lut, apply_voi_lut


def _decode(ds: Any, name: str) -> np.ndarray:
    """The pixels of ``ds`` as pydicom decodes them; :class:`DataError` naming the transfer syntax if it cannot."""
    try:
        return ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom's decoders raise many types
        why = f"{type(e).__name__}: {' '.join(str(e).split())}"  # pydicom's message lists the plugins it tried
        syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
        if syntax is not None and syntax.is_compressed:
            raise DataError(f"{name}: cannot decode its pixel data, compressed as {syntax.name} ({syntax}): {why}; if no "
                            f"decoder for it is installed, install one (pydicom's docs list which): {_DECODERS}") from None
        raise DataError(f"{name}: cannot decode its pixel data ({why})") from None


def _window(a: np.ndarray, ds: Any, apply_voi_lut: Any) -> tuple[np.ndarray, float, float] | None:
    """``a`` through the file's VOI LUT or window, with the values its two ends map to; None if it has neither."""
    lut = (ds.get("VOILUTSequence") or [{}])[0]
    if "LUTDescriptor" in lut and "LUTData" in lut:  # preferred over a window, as pydicom does
        low, high = 0.0, 2.0 ** lut.LUTDescriptor[2] - 1  # the LUT's output range (PS3.3 C.11.2.1.1)
        a = np.rint(a).astype(np.int64)  # a LUT is indexed by integers
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        low, high = (float(v) for v in apply_voi_lut(np.array([-np.inf, np.inf]), ds))
    else:
        return None
    return np.asarray(apply_voi_lut(a, ds), np.float64), low, high


def read_dicom(data: bytes, name: str, *, window: bool = False) -> np.ndarray:
    """The one image in DICOM ``data`` as float32 on the 0-255 scale: (H, W) for MONOCHROME1/MONOCHROME2,
    (H, W, 3) for RGB (the steps are in the module docstring). :class:`DataError` naming ``name`` for a
    file that is not DICOM, holds no image, several frames or values that are not finite;
    :class:`MissingDependency` without pydicom."""
    pydicom, apply_modality_lut, apply_voi_lut = _pydicom(name)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        kind = str(ds.get("PhotometricInterpretation", "")).strip()
        frames = int(ds.get("NumberOfFrames") or 1)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on malformed files
        raise DataError(f"{name}: cannot decode DICOM ({type(e).__name__}: {e})") from None
    if not any(k in ds for k in _PIXELS):
        raise DataError(f"{name}: the DICOM file holds no pixel data (a structured report, a header-only or a truncated file?); "
                        "give a DICOM image")
    if frames != 1:
        raise DataError(f"{name}: {frames} frames, but one image (one frame) is expected; split it into single-frame files")
    if kind not in _KINDS:
        raise DataError(f"{name}: photometric interpretation {kind or '(missing)'} is not supported; "
                        f"{', '.join(_KINDS)} are (convert the file)")
    a = _decode(ds, name)
    if a.ndim != (3 if kind == "RGB" else 2) or (kind == "RGB" and a.shape[2] != 3):
        raise DataError(f"{name}: decoded pixels of shape {a.shape} do not fit {kind}; the file is inconsistent")
    try:
        a = np.asarray(a if kind == "RGB" else apply_modality_lut(a, ds), np.float64)
    except Exception as e:  # noqa: BLE001 - malformed RescaleSlope, RescaleIntercept or Modality LUT
        raise DataError(f"{name}: cannot apply its modality LUT (rescale slope and intercept): {type(e).__name__}: {e}") from None
    if not np.isfinite(a).all():
        raise DataError(f"{name}: {int((~np.isfinite(a)).sum())} NaN or infinite pixel value(s); refusing to read it")
    if kind == "RGB":
        return (a * (255.0 / (2.0 ** int(ds.get("BitsStored") or 8) - 1))).astype(np.float32)
    try:
        windowed = _window(a, ds, apply_voi_lut) if window else None
    except Exception as e:  # noqa: BLE001 - pydicom raises ValueError, NotImplementedError, ... on a bad window
        raise DataError(f"{name}: cannot apply its VOI window ({type(e).__name__}: {e}); read it with window=False") from None
    a, low, high = windowed if windowed is not None else (a, float(a.min()), float(a.max()))
    a = (a - low) * (255.0 / (high - low)) if high != low else np.zeros_like(a)
    return (255.0 - a if kind == "MONOCHROME1" else a).astype(np.float32)
