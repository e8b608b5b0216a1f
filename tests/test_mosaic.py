"""CIFAR-10 mosaics (densenet.data.mosaic): 2x2 cells of 32x32 images or black, labels = the classes present.

Most tests build from a small generated zip in the CIFAR-10 JPEG layout whose every image is one solid
colour of its own, so a mosaic's cells can be traced back to the source images they came from."""
from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
import zipfile
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densenet.data import DataError
from densenet.data.label_file import read_label_file
from densenet.data.mosaic import CLASSES, main, make_mosaics

REAL_ZIP = Path("/work/shared/data/cifar10-jpeg.zip")
PER_CLASS = {"train": 10, "test": 6}  # 160 source images, each its own colour
# well-separated colours (channel steps of 40; none near black), far beyond what JPEG q75 moves a solid colour
PALETTE = [np.array(c, float) for c in product(range(40, 241, 40), repeat=3)]
SMALL = {"train": 20, "val": 5, "test": 10}


def _jpeg(colour: np.ndarray, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def _sources() -> list[tuple[str, str, int]]:
    """(split, class, number) of every source image; its index in this list picks its colour."""
    return [(split, cls, i) for split, n in PER_CLASS.items() for cls in CLASSES for i in range(n)]


def _zip(path: Path, skip: str | None = None, odd: dict[str, bytes] | None = None) -> Path:
    """A zip in the CIFAR-10 JPEG layout (stored); ``skip``: a folder prefix left out; ``odd``: members replaced."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for k, (split, cls, i) in enumerate(_sources()):
            name = f"{split}/{cls}/{i:04d}.jpg"
            if skip is None or not name.startswith(skip):
                z.writestr(name, (odd or {}).get(name, _jpeg(PALETTE[k])))
    return path


@pytest.fixture(scope="module")
def small_zip(tmp_path_factory) -> Path:
    return _zip(tmp_path_factory.mktemp("cifar") / "cifar10-jpeg.zip")


@pytest.fixture(scope="module")
def built(small_zip, tmp_path_factory) -> Path:
    return make_mosaics(small_zip, tmp_path_factory.mktemp("mosaics") / "out", **SMALL, seed=3)


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _cells(png: Path) -> list[int | None]:
    """The source image (index into :func:`_sources`) in each of the 4 cells, None for a black cell."""
    a = np.asarray(Image.open(png))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    found: list[int | None] = []
    for k in range(4):
        r, c = divmod(k, 2)
        cell = a[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32].reshape(-1, 3).astype(float)
        if not cell.any():
            found.append(None)
            continue
        mean = cell.mean(axis=0)
        assert np.abs(cell - mean).max() < 12, "a cell holds one solid-colour source image"
        distance = [np.abs(mean - p).max() for p in PALETTE[:len(_sources())]]
        assert min(distance) < 12
        found.append(int(np.argmin(distance)))
    return found


def test_the_csv_has_chexpert_columns_one_row_per_mosaic_and_the_splits_in_order(built):
    with open(built, newline="") as f:
        header = next(csv.reader(f))
    assert header == ["Path", "Split", *CLASSES]
    rows = _rows(built)
    assert [r["Split"] for r in rows] == ["train"] * 20 + ["val"] * 5 + ["test"] * 10
    for split in SMALL:
        paths = [r["Path"] for r in rows if r["Split"] == split]
        assert paths == [f"images/{split}/{i:06d}.png" for i in range(SMALL[split])]
    assert all(r[c] in ("1.0", "0.0") for r in rows for c in CLASSES)
    assert sorted(p.relative_to(built.parent).as_posix() for p in (built.parent / "images").rglob("*.png")) == \
        sorted(r["Path"] for r in rows)
    for r in rows:
        with Image.open(built.parent / r["Path"]) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))


def test_the_labels_are_the_classes_of_the_non_empty_cells_and_every_mosaic_has_one(built):
    sources = _sources()
    for r in _rows(built):
        cells = _cells(built.parent / r["Path"])
        assert any(c is not None for c in cells)
        present = {sources[c][1] for c in cells if c is not None}
        assert {cls for cls in CLASSES if r[cls] == "1.0"} == present
        side = {"train": "train", "val": "train", "test": "test"}[r["Split"]]
        assert all(sources[c][0] == side for c in cells if c is not None), "val and train from train/, test from test/"


def test_no_source_image_is_used_twice_or_on_both_sides(built):
    used: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for r in _rows(built):
        used[r["Split"]] += [c for c in _cells(built.parent / r["Path"]) if c is not None]
    every = used["train"] + used["val"] + used["test"]
    assert len(every) == len(set(every))
    assert not set(used["train"] + used["val"]) & set(used["test"])


def test_the_label_file_reader_reads_the_csv_with_its_split(built):
    table = read_label_file(built)
    assert table.labels == list(CLASSES) and table.layout == "columns" and len(table) == 35
    assert table.split == ["train"] * 20 + ["val"] * 5 + ["test"] * 10
    assert set(np.unique(table.targets)) <= {0.0, 1.0} and (table.targets.sum(axis=1) >= 1).all()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_same_arguments_give_byte_identical_files_and_another_seed_does_not(small_zip, built, tmp_path):
    again = make_mosaics(small_zip, tmp_path / "again", **SMALL, seed=3)
    assert _files(again.parent) == _files(built.parent)
    other = make_mosaics(small_zip, tmp_path / "other", **SMALL, seed=4)
    assert other.read_bytes() != built.read_bytes()


def test_empty_zero_fills_every_cell_and_a_high_empty_still_leaves_one_image(small_zip, tmp_path):
    full = make_mosaics(small_zip, tmp_path / "full", train=5, val=2, test=3, empty=0.0)
    assert all(None not in _cells(full.parent / r["Path"]) for r in _rows(full))
    sparse = make_mosaics(small_zip, tmp_path / "sparse", train=20, val=5, test=10, empty=0.95)
    counts = [sum(c is not None for c in _cells(sparse.parent / r["Path"])) for r in _rows(sparse)]
    assert min(counts) >= 1 and counts.count(1) > len(counts) // 2


@pytest.mark.parametrize("kwargs, words", [
    ({"train": 0}, "train=0"), ({"val": -1}, "val=-1"), ({"test": True}, "test=True"), ({"train": 2.5}, "train=2.5"),
    ({"empty": -0.1}, "[0, 1)"), ({"empty": 1.0}, "[0, 1)"), ({"empty": float("nan")}, "[0, 1)"),
    ({"seed": -1}, "seed=-1"),
])
def test_bad_counts_empty_or_seed_are_refused(small_zip, tmp_path, kwargs, words):
    with pytest.raises(DataError, match=re.escape(words)):
        make_mosaics(small_zip, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_missing_zip_or_a_file_that_is_not_a_zip_is_refused(tmp_path):
    with pytest.raises(DataError, match="not found.*train/<class>"):
        make_mosaics(tmp_path / "nowhere.zip", tmp_path / "out", **SMALL)
    (tmp_path / "notes.zip").write_text("not a zip")
    with pytest.raises(DataError, match="not a zip file"):
        make_mosaics(tmp_path / "notes.zip", tmp_path / "out", **SMALL)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("skip, named", [("test/", "test/airplane/"), ("train/cat/", "train/cat/")])
def test_a_zip_without_the_class_folders_is_refused_naming_them(tmp_path, skip, named):
    source = _zip(tmp_path / "partial.zip", skip=skip)
    with pytest.raises(DataError, match=f"no images in .*{named}.*expected .*train/<class>/<NNNN>.jpg"):
        make_mosaics(source, tmp_path / "out", **SMALL)
    assert not (tmp_path / "out" / "labels.csv").exists()


def test_more_image_cells_than_source_images_are_refused(small_zip, tmp_path):
    with pytest.raises(DataError, match=r"train and .* val mosaics have .* image cells .* train/ holds 100 images"):
        make_mosaics(small_zip, tmp_path / "a", train=40, val=5, test=2)
    with pytest.raises(DataError, match=r"test mosaics have .* image cells .* test/ holds 60 images"):
        make_mosaics(small_zip, tmp_path / "b", train=2, val=2, test=40)
    assert not (tmp_path / "a" / "labels.csv").exists() and not (tmp_path / "b" / "labels.csv").exists()


def test_an_out_folder_that_already_holds_labels_csv_is_refused_and_left_alone(small_zip, built):
    before = built.read_bytes()
    with pytest.raises(DataError, match="already exists: pick another folder .* or delete"):
        make_mosaics(small_zip, built.parent, **SMALL)
    assert built.read_bytes() == before


def test_a_source_image_that_is_not_32x32_or_not_an_image_is_refused_naming_it(tmp_path):
    # every train image is used when the mosaics need them all (empty=0: 4 cells each)
    for k, (odd, words) in enumerate([(_jpeg(PALETTE[0], size=40), "a 40x40 image"), (b"not a jpeg", "cannot decode")]):
        source = _zip(tmp_path / f"odd{k}.zip", odd={"train/dog/0003.jpg": odd})
        with pytest.raises(DataError, match=f"train/dog/0003.jpg: {words}"):
            make_mosaics(source, tmp_path / f"out{k}", train=20, val=5, test=1, empty=0.0)
        assert not (tmp_path / f"out{k}" / "labels.csv").exists()


def test_the_command_line_prints_one_line_and_refuses_bad_input_with_status_2(small_zip, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(small_zip), str(out), "--train", "6", "--val", "2", "--test", "3", "--empty", "0.5", "--seed", "1"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "6 train, 2 val, 3 test mosaics" in line and str(out / "labels.csv") in line
    assert all(f"{cls} " in line for cls in CLASSES)
    assert main([str(small_zip), str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "already exists" in captured.err and captured.out == ""
    assert main([str(small_zip), str(tmp_path / "x"), "--empty", "1"]) == 2
    assert "error: empty=1.0" in capsys.readouterr().err


def test_python_dash_m_runs_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "densenet.data.mosaic", str(tmp_path / "none.zip"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "none.zip" in done.stderr


@pytest.mark.skipif(not REAL_ZIP.is_file(), reason=f"{REAL_ZIP} not here")
def test_mosaics_from_the_real_cifar10_zip(tmp_path):
    csv_path = make_mosaics(REAL_ZIP, tmp_path / "real", train=12, val=4, test=8, seed=0)
    rows = _rows(csv_path)
    assert [r["Split"] for r in rows] == ["train"] * 12 + ["val"] * 4 + ["test"] * 8
    for r in rows:
        a = np.asarray(Image.open(csv_path.parent / r["Path"]))
        assert a.shape == (64, 64, 3)
        filled = sum(bool(a[(k // 2) * 32:(k // 2 + 1) * 32, (k % 2) * 32:(k % 2 + 1) * 32].any()) for k in range(4))
        labels = sum(r[c] == "1.0" for c in CLASSES)
        assert 1 <= labels <= filled
    table = read_label_file(csv_path)
    assert table.labels == list(CLASSES) and len(table) == 24
