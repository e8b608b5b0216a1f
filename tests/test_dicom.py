"""DICOM images (densenet.data.dicom): real files written by pydicom, read back at full depth."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from densenet.data.dicom import DICOM_SUFFIXES, is_dicom, read_dicom
from densenet.data.errors import DataError
from densenet.errors import MissingDependency

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)


def dicom_bytes(tmp_path: Path, pixels: np.ndarray | None, kind: str = "MONOCHROME2", syntax: str = ExplicitVRLittleEndian,
                **elements: object) -> bytes:
    """A DICOM file of ``pixels`` ((H, W) uint16/int16, or (H, W, 3) uint8; None: no pixel data) saved
    to ``tmp_path`` and read back; ``elements`` are set on the dataset last."""
    meta = FileMetaDataset()
    sop_class = CTImageStorage if elements.get("RescaleSlope") is not None else SecondaryCaptureImageStorage
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "OT", "Test^Dicom", "1"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.PhotometricInterpretation = kind
        ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
        ds.PixelData = pixels.tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    path = tmp_path / "image.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path.read_bytes()


def ramp(h: int = 4, w: int = 5, start: int = 1000, step: int = 300) -> np.ndarray:
    return (start + step * np.arange(h * w)).reshape(h, w).astype(np.uint16)


def test_monochrome2_16_bit_round_trip(tmp_path: Path) -> None:
    raw = ramp()
    a = read_dicom(dicom_bytes(tmp_path, raw), "x.dcm")
    assert a.shape == raw.shape and a.dtype == np.float32
    expected = (raw - raw.min()) * 255.0 / (raw.max() - raw.min())
    np.testing.assert_allclose(a, expected, atol=1e-4)
    assert a.min() == 0 and a.max() == 255


def test_low_bits_are_kept(tmp_path: Path) -> None:
    high = np.full((4, 4), 0x1200, np.uint16)
    high[0, 0], high[3, 3] = 0, 0xFFFF  # same range, so the same min-max scaling
    other = high.copy()
    other[1:3, 1:3] += np.arange(1, 5, dtype=np.uint16).reshape(2, 2)  # differs only in the low 8 bits
    a, b = read_dicom(dicom_bytes(tmp_path, high), "a.dcm"), read_dicom(dicom_bytes(tmp_path, other), "b.dcm")
    assert not np.array_equal(a, b)
    assert len(np.unique(b[1:3, 1:3])) == 4


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    raw = ramp()
    mono2 = read_dicom(dicom_bytes(tmp_path, raw), "m2.dcm")
    mono1 = read_dicom(dicom_bytes(tmp_path, raw, "MONOCHROME1"), "m1.dcm")
    np.testing.assert_allclose(mono1, 255.0 - mono2, atol=1e-4)
    assert mono1[0, 0] == 255 and mono1[-1, -1] == 0  # the lowest stored value is the brightest


def test_rescale_then_window_in_hounsfield_units(tmp_path: Path) -> None:
    stored = np.array([[0, 500, 1000], [1020, 1040, 2000]], np.uint16)  # HU = 2 * stored - 1000
    hu = 2.0 * stored - 1000.0  # -1000, 0, 1000, 1040, 1080, 3000
    # a window of [1000, 1100) HU: only meaningful once the rescale is applied (raw values 1000..1100
    # would put most pixels inside it)
    data = dicom_bytes(tmp_path, stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1050, WindowWidth=100)
    np.testing.assert_allclose(read_dicom(data, "ct.dcm"), (hu - hu.min()) * 255.0 / (hu.max() - hu.min()), atol=1e-4)
    a = read_dicom(data, "ct.dcm", window=True)
    # pydicom's LINEAR window: ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to [0, 1]
    expected = np.clip((hu - 1049.5) / 99 + 0.5, 0, 1) * 255
    np.testing.assert_allclose(a, expected, atol=1e-3)
    assert a[0, 0] == 0 and a[0, 2] == 0 and a[1, 2] == 255  # below and above the window clip


def test_window_maps_the_window_not_the_image_range(tmp_path: Path) -> None:
    raw = np.array([[100, 150], [200, 250]], np.uint16)  # all inside a window of [0, 1000]
    a = read_dicom(dicom_bytes(tmp_path, raw, WindowCenter=500, WindowWidth=1000), "w.dcm", window=True)
    np.testing.assert_allclose(a, ((raw - 499.5) / 999 + 0.5) * 255, atol=1e-3)
    assert a.max() < 100


def test_window_from_a_voi_lut(tmp_path: Path) -> None:
    raw = np.arange(20, dtype=np.uint16).reshape(4, 5)
    table = [0, 20, 40, 60, 80, 100, 120, 140, 160, 255]
    item = Dataset()
    item.add_new(0x00283002, "US", [len(table), 5, 8])  # LUT Descriptor: entries, first value mapped, bits
    item.add_new(0x00283006, "US", table)  # LUT Data
    data = dicom_bytes(tmp_path, raw, VOILUTSequence=pydicom.Sequence([item]))
    a = read_dicom(data, "lut.dcm", window=True)
    np.testing.assert_array_equal(a, np.array(table, np.float32)[np.clip(raw.astype(int) - 5, 0, len(table) - 1)])
    np.testing.assert_allclose(read_dicom(data, "lut.dcm"), raw * 255.0 / 19, atol=1e-4)  # window=False ignores it


def test_window_without_one_in_the_file_uses_the_full_range(tmp_path: Path) -> None:
    data = dicom_bytes(tmp_path, ramp())
    np.testing.assert_array_equal(read_dicom(data, "x.dcm", window=True), read_dicom(data, "x.dcm"))


def test_constant_image_gives_zeros(tmp_path: Path) -> None:
    a = read_dicom(dicom_bytes(tmp_path, np.full((3, 3), 777, np.uint16)), "flat.dcm")
    np.testing.assert_array_equal(a, np.zeros((3, 3), np.float32))


def test_signed_pixels(tmp_path: Path) -> None:
    raw = np.array([[-1024, 0], [1000, 3071]], np.int16)
    a = read_dicom(dicom_bytes(tmp_path, raw), "signed.dcm")
    np.testing.assert_allclose(a, (raw + 1024.0) * 255 / 4095, atol=1e-4)


def test_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    a = read_dicom(dicom_bytes(tmp_path, rgb, "RGB"), "colour.dcm")
    assert a.shape == (6, 7, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, rgb.astype(np.float32))  # 8-bit RGB keeps its values, as a PNG would


def test_no_pixel_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^sr\.dcm: .*no pixel data"):
        read_dicom(dicom_bytes(tmp_path, None), "sr.dcm")


@pytest.mark.parametrize("syntax", [JPEGLSLossless, RLELossless])
def test_compressed_pixel_data_that_cannot_be_decoded(tmp_path: Path, syntax: str) -> None:
    raw = ramp()
    data = dicom_bytes(tmp_path, raw, syntax=syntax, PixelData=encapsulate([b"\x00\x01\x02\x03" * 4]))
    with pytest.raises(DataError) as e:
        read_dicom(data, "c.dcm")
    message = str(e.value)
    assert message.startswith("c.dcm: ") and syntax.name in message and str(syntax) in message
    assert "pylibjpeg" in message and "\n" not in message


def test_several_frames(tmp_path: Path) -> None:
    frames = np.stack([ramp(), ramp()])
    data = dicom_bytes(tmp_path, frames[0], NumberOfFrames=2, PixelData=frames.tobytes())
    with pytest.raises(DataError, match=r"^multi\.dcm: 2 frames"):
        read_dicom(data, "multi.dcm")
    one = dicom_bytes(tmp_path, ramp(), NumberOfFrames=1)
    assert read_dicom(one, "one.dcm").shape == (4, 5)


def test_unsupported_photometric_interpretation(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^p\.dcm: photometric interpretation PALETTE COLOR"):
        read_dicom(dicom_bytes(tmp_path, ramp(), "PALETTE COLOR"), "p.dcm")


def test_not_finite(tmp_path: Path) -> None:
    data = dicom_bytes(tmp_path, ramp(), RescaleSlope="1e400", RescaleIntercept=0)
    with pytest.raises(DataError, match=r"^inf\.dcm: .*(NaN or infinite|rescale)"):
        read_dicom(data, "inf.dcm")


@pytest.mark.parametrize("data", [b"", b"not a dicom file at all", bytes(range(256)) * 4])
def test_garbage(data: bytes) -> None:
    with pytest.raises(DataError, match=r"^junk\.dcm: cannot decode DICOM \("):
        read_dicom(data, "junk.dcm")


def test_truncated(tmp_path: Path) -> None:
    data = dicom_bytes(tmp_path, ramp(40, 50))
    with pytest.raises(DataError, match=r"^cut\.dcm: cannot decode its pixel data \(.*less than expected"):
        read_dicom(data[:-100], "cut.dcm")  # the pixel data cut short
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"^cut\.dcm: .*no pixel data.*truncated"):
        read_dicom(b"\x00" * 128 + b"DICM" + b"\xff" * 64, "cut.dcm")  # the preamble and a few bytes of junk


def test_bad_window(tmp_path: Path) -> None:
    data = dicom_bytes(tmp_path, ramp(), WindowCenter=10, WindowWidth=0)
    with pytest.raises(DataError, match=r"^w\.dcm: cannot apply its VOI window .*Window Width.*window=False"):
        read_dicom(data, "w.dcm", window=True)
    assert read_dicom(data, "w.dcm").shape == (4, 5)


def test_without_pydicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = dicom_bytes(tmp_path, ramp())
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(MissingDependency, match=r'^x\.dcm: .*pip install "densenet\[dicom\]".*pip install pydicom'):
        read_dicom(data, "x.dcm")


def test_is_dicom(tmp_path: Path) -> None:
    assert is_dicom(dicom_bytes(tmp_path, ramp()))
    assert not is_dicom(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    assert not is_dicom(b"")
    assert ".dcm" in DICOM_SUFFIXES and ".dicom" in DICOM_SUFFIXES
