"""Volume and signal datasets: NIfTI (.nii, .nii.gz; nibabel's own test files too) and .npy readers,
per-file normalisation, fitting to the size, augmentation as a function of (seed, epoch, position),
resumes and shards, bad input named, and `densenet train` choosing the model's dimensions."""
from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from densenet.data import DataError, ExpansionRefused, build_data
from densenet.data.volumes import (
    fit_signal,
    fit_volume,
    normalise,
    read_signal,
    read_volume,
)
from densenet.io.checkpoint import load_checkpoint
from densenet.training.config import ConfigError

nib = pytest.importorskip("nibabel")
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def nifti_bytes(a: np.ndarray, compressed: bool = False, slope: float | None = None) -> bytes:
    image = nib.Nifti1Image(a, np.eye(4))
    if slope is not None:
        image.header.set_slope_inter(slope, 1.0)
    raw = image.to_bytes()
    return gzip.compress(raw) if compressed else raw


def write_tree(root: Path, per_class: int = 4, shape=(10, 12, 9), channels: int = 0, kinds=("npy", "nii", "nii.gz"),
               seed: int = 0) -> Path:
    """<class>/<file> volumes: class b is brighter; files of every kind."""
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = (rng.normal(size=((channels,) if channels else ()) + shape) + 3 * label).astype(np.float32)
            kind = kinds[i % len(kinds)]
            if kind == "npy":
                (root / cls / f"{i}.npy").write_bytes(npy_bytes(a))
            else:
                nifti = np.moveaxis(a, 0, -1) if channels else a  # NIfTI: channels last
                (root / cls / f"{i}.{kind}").write_bytes(nifti_bytes(nifti, compressed=kind == "nii.gz"))
    return root


# ---------------------------------------------------------------------------- readers
def test_npy_and_nifti_readers_agree_with_numpy_and_nibabel(tmp_path):
    a = np.random.default_rng(1).normal(size=(6, 7, 5)).astype(np.float32)
    np.testing.assert_array_equal(read_volume(npy_bytes(a), "a.npy"), a[None])
    np.testing.assert_array_equal(read_volume(npy_bytes(np.asfortranarray(a)), "f.npy"), a[None])
    np.testing.assert_array_equal(read_volume(nifti_bytes(a), "a.nii"), a[None])
    np.testing.assert_array_equal(read_volume(nifti_bytes(a, compressed=True), "a.nii.gz"), a[None])
    ints = np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5)
    np.testing.assert_allclose(read_volume(nifti_bytes(ints, slope=2.0), "s.nii")[0], ints * 2.0 + 1.0)  # scaled
    four = np.random.default_rng(2).normal(size=(2, 6, 7, 5)).astype(np.float32)
    np.testing.assert_array_equal(read_volume(npy_bytes(four), "c.npy"), four)  # channels first in .npy
    np.testing.assert_array_equal(read_volume(nifti_bytes(np.moveaxis(four, 0, -1)), "c.nii"), four)  # last in NIfTI
    np.testing.assert_array_equal(read_signal(npy_bytes(np.arange(10.0)), "s.npy"), np.arange(10.0, dtype=np.float32)[None])


@pytest.mark.parametrize("name", ["anatomical.nii", "functional.nii", "example4d.nii.gz", "example_nifti2.nii.gz",
                                  "standard.nii.gz"])
def test_nibabels_own_files(name):
    """Real NIfTI-1 and NIfTI-2 files that nibabel ships: the same voxels as nibabel reads."""
    path = NIBABEL_DATA / name
    if not path.is_file():
        pytest.skip(f"nibabel {nib.__version__} does not ship {name}")
    expected = np.asarray(nib.load(path).get_fdata(), np.float32)
    got = read_volume(path.read_bytes(), name)
    channels = int(np.prod(expected.shape[3:])) if expected.ndim > 3 else 1
    assert got.shape == (channels, *expected.shape[:3])
    np.testing.assert_array_equal(got, np.moveaxis(expected.reshape(*expected.shape[:3], channels), -1, 0))


def test_bad_files_are_named(tmp_path, monkeypatch):
    a = np.zeros((6, 7, 5), np.float32)
    good = npy_bytes(a)
    with pytest.raises(DataError, match=r"cut\.npy: truncated: the header declares 840 bytes of data, the file holds 100"):
        read_volume(good[: len(good) - 740], "cut.npy")
    with pytest.raises(DataError, match=r"obj\.npy: .*(unsupported element type|not a readable)"):
        read_volume(_object_npy(), "obj.npy")
    with pytest.raises(DataError, match=r"nan\.npy: 1 NaN or infinite value"):
        read_volume(npy_bytes(np.where(np.arange(210).reshape(6, 7, 5) == 3, np.nan, 0.0)), "nan.npy")
    with pytest.raises(DataError, match=r"flat\.npy: an array of shape \(6, 7\) is not a volume"):
        read_volume(npy_bytes(np.zeros((6, 7))), "flat.npy")
    with pytest.raises(DataError, match=r"big\.npy: 6x7x5 = 210 values exceeds the limit of 100"):
        read_volume(good, "big.npy", max_values=100)
    with pytest.raises(DataError, match=r"junk\.nii: not a NIfTI file"):
        read_volume(b"\x00" * 400, "junk.nii")
    nii = nifti_bytes(a)
    with pytest.raises(DataError, match=r"short\.nii: truncated: the header declares 1,192 bytes"):
        read_volume(nii[:-100], "short.nii")
    with pytest.raises(DataError, match=r"cut\.nii\.gz: truncated or corrupt gzip"):
        read_volume(gzip.compress(nii)[:-30], "cut.nii.gz")
    with pytest.raises(DataError, match=r"wide\.npy: 100 channels \(at most 64\)"):
        read_volume(npy_bytes(np.zeros((100, 2, 2, 2), np.float32)), "wide.npy")
    # a decompression bomb: refused before it is expanded in full
    import densenet.data.archive as archive
    import densenet.data.volumes as volumes

    monkeypatch.setattr(archive, "EXPANSION_FREE_BYTES", 1000)
    monkeypatch.setattr(volumes, "EXPANSION_FREE_BYTES", 1000)
    with pytest.raises(ExpansionRefused, match=r"bomb\.nii\.gz: refused gzip content: .* more than the limit of 200x"):
        read_volume(gzip.compress(nifti_bytes(np.zeros((64, 64, 64), np.float32))), "bomb.nii.gz")


def _object_npy() -> bytes:
    """A .npy holding pickled objects (the header says dtype '|O')."""
    buf = io.BytesIO()
    np.save(buf, np.array([1, "a"], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_nifti_without_nibabel_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel now raises ImportError
    with pytest.raises(DataError, match=r"needs nibabel: pip install 'densenet\[volumes\]'.*\.npy volumes need nothing"):
        read_volume(nifti_bytes(np.zeros((4, 4, 4), np.float32)), "a.nii")
    assert read_volume(npy_bytes(np.zeros((4, 4, 4), np.float32)), "a.npy").shape == (1, 4, 4, 4)


# ---------------------------------------------------------------------------- preprocessing
def test_normalise_fit_and_augment():
    rng = np.random.default_rng(3)
    a = normalise((rng.normal(size=(2, 9, 10, 11)) * [[[[5.0]]], [[[0.1]]]] + 7).astype(np.float32))
    np.testing.assert_allclose(a.reshape(2, -1).mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(a.reshape(2, -1).std(1), 1, atol=1e-4)
    assert not normalise(np.ones((1, 3, 3, 3), np.float32)).any()  # a constant volume: zeros, no NaN
    np.testing.assert_array_equal(fit_volume(a, (9, 10, 11)), a)  # eval at the volume's own size: unchanged
    assert fit_volume(a, (16, 8, 12)).shape == (2, 16, 8, 12)
    centre = fit_volume(a, (5, 12, 11), fit="crop")  # cropped along D, zero-padded along H
    np.testing.assert_array_equal(centre[:, :, 1:11], a[:, 2:7])
    assert not centre[:, :, 0].any() and not centre[:, :, 11].any()
    views = [fit_volume(a, (8, 8, 8), np.random.default_rng(s)) for s in range(8)]
    assert len({v.tobytes() for v in views}) == 8  # random crops and flips
    again = [fit_volume(a, (8, 8, 8), np.random.default_rng(s)) for s in range(8)]
    assert all((v == w).all() for v, w in zip(views, again))  # a function of the generator's seed
    s = normalise(rng.normal(size=(3, 50)).astype(np.float32))
    np.testing.assert_array_equal(fit_signal(s, 20), s[:, 15:35])
    assert fit_signal(s, 60)[:, :5].sum() == 0 and fit_signal(s, 60).shape == (3, 60)


# ---------------------------------------------------------------------------- datasets
def test_volumes_dataset(tmp_path):
    root = write_tree(tmp_path / "vol", per_class=5)
    data = build_data("volumes", root, batch_size=2, eval_batch_size=3, image_size=(8, 10, 12), workers=0,
                      val_fraction=0.2)
    assert (data.num_classes, data.class_names, data.spatial_dims, data.in_channels) == (2, ["a", "b"], 3, 1)
    assert data.image_size == (8, 10, 12) and data.model_args() == {"spatial_dims": 3, "in_channels": 1}
    assert data.train.num_images == 8 and data.test.num_images == 2
    x, y = next(iter(data.train.batches(0)))
    assert x.shape == (2, 1, 8, 10, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    seen = torch.cat([y for _, y in data.test.batches(0)])
    assert seen.numel() == 2
    cube = build_data("volumes", root, batch_size=2, image_size=16, workers=0)
    assert cube.image_size == (16, 16, 16) and next(iter(cube.test.batches(0)))[0].shape[2:] == (16, 16, 16)
    assert data.class_counts == [4, 4]  # training volumes per class (report.json, the imbalance note)
    with pytest.raises(DataError, match="class-balanced sampling is for image datasets, not volumes; leave out "
                                        "--balanced-sampler"):
        build_data("volumes", root, batch_size=2, workers=0, balanced=True)


def test_batches_are_a_function_of_seed_epoch_and_step(tmp_path):
    root = write_tree(tmp_path / "vol", per_class=6, kinds=("npy",))
    data = build_data("volumes", root, batch_size=4, image_size=8, workers=0, val_fraction=0.25)
    first = list(data.train.batches(1))
    resumed = list(data.train.batches(1, start=1))
    assert len(first) == 2 and len(resumed) == 1
    torch.testing.assert_close(resumed[0][0], first[1][0], rtol=0, atol=0)
    halves = [list(data.train.batches(1, rank=r, world_size=2)) for r in range(2)]
    for i, (x, y) in enumerate(first):  # the union of the shards is the single-process batch
        torch.testing.assert_close(torch.cat([halves[0][i][0], halves[1][i][0]]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([halves[0][i][1], halves[1][i][1]]), y)
    other = build_data("volumes", root, batch_size=4, image_size=8, workers=2, val_fraction=0.25)
    for (x, y), (x2, y2) in zip(first, other.train.batches(1)):  # worker processes: the same batches
        torch.testing.assert_close(x2, x, rtol=0, atol=0)
        assert torch.equal(y, y2)
    assert not torch.equal(next(iter(data.train.batches(2)))[0], first[0][0])  # another epoch, another order


def test_channels_and_splits(tmp_path):
    root = write_tree(tmp_path / "multi", channels=2, per_class=3)
    data = build_data("volumes", root, batch_size=2, image_size=8, workers=0, val_fraction=0.3)
    assert data.in_channels == 2 and next(iter(data.train.batches(0)))[0].shape == (2, 2, 8, 8, 8)
    (root / "a" / "odd.npy").write_bytes(npy_bytes(np.zeros((3, 10, 12, 9), np.float32)))
    data = build_data("volumes", root, batch_size=1, image_size=8, workers=0, val_fraction=0.1)
    with pytest.raises(DataError, match=r"odd\.npy: 3 channel\(s\), but the dataset's first file has 2"):
        list(data.train.batches(0)) + list(data.test.batches(0))
    split = tmp_path / "split"
    write_tree(split / "train", per_class=2, kinds=("npy",))
    write_tree(split / "test", per_class=1, kinds=("nii.gz",))
    data = build_data("volumes", split, batch_size=2, image_size=8, workers=0)
    assert data.train.num_images == 4 and data.test.num_images == 2
    with pytest.raises(DataError, match="no class folders|empty class folder"):
        (tmp_path / "empty" / "a").mkdir(parents=True)
        build_data("volumes", tmp_path / "empty", workers=0)
    with pytest.raises(DataError, match="volumes needs --data"):
        build_data("volumes", None)


def test_signals_dataset(tmp_path):
    rng = np.random.default_rng(4)
    for label, cls in enumerate(("normal", "afib", "other")):
        (tmp_path / "sig" / cls).mkdir(parents=True)
        for i in range(4):
            np.save(tmp_path / "sig" / cls / f"{i}.npy", rng.normal(size=(12, 300 + 10 * i)).astype(np.float32) + label)
    data = build_data("signals", tmp_path / "sig", batch_size=3, image_size=256, workers=0, val_fraction=0.25)
    assert (data.spatial_dims, data.in_channels, data.image_size, data.num_classes) == (1, 12, 256, 3)
    x, _ = next(iter(data.train.batches(0)))
    assert x.shape == (3, 12, 256)
    default = build_data("signals", tmp_path / "sig", batch_size=3, workers=0)
    assert default.image_size in (300, 310, 320, 330)  # the first training file's length


# ---------------------------------------------------------------------------- training
def test_train_picks_the_models_dimensions_from_the_data(tmp_path, capsys):
    from densenet.cli import main

    root = write_tree(tmp_path / "vol", per_class=4, shape=(12, 12, 12))
    out = tmp_path / "run"
    code = main(["train", "--dataset", "volumes", "--data", str(root), "--image-size", "12", "14", "16", "--model",
                 "densenet_bc16_k4", "--epochs", "1", "--batch-size", "2", "--workers", "0", "--out", str(out), "--quiet"])
    assert code == 0
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["model_config"]["spatial_dims"] == 3 and state["model_config"]["in_channels"] == 1
    assert state["model"]["features.conv0.weight"].shape == (8, 1, 3, 3, 3)
    with pytest.raises(ConfigError, match=r"--spatial-dims 2, but volumes is 3-D data"):
        from densenet.training import resolve_config, train
        train(resolve_config({"dataset": "volumes", "data": str(root), "spatial_dims": 2, "model": "densenet_bc16_k4",
                              "epochs": 1, "batch_size": 2, "workers": 0, "image_size": 12, "out": str(tmp_path / "r2")}))
    assert main(["eval", str(out / "checkpoint.pt"), "--data", str(root), "--workers", "0"]) == 0
    assert "volumes test set" in capsys.readouterr().out


def test_train_on_signals(tmp_path):
    from densenet.cli import main

    rng = np.random.default_rng(5)
    for cls in ("a", "b"):
        (tmp_path / "sig" / cls).mkdir(parents=True)
        for i in range(4):
            np.save(tmp_path / "sig" / cls / f"{i}.npy", rng.normal(size=(3, 64)).astype(np.float32))
    out = tmp_path / "run"
    assert main(["train", "--dataset", "signals", "--data", str(tmp_path / "sig"), "--epochs", "1", "--batch-size", "2",
                 "--workers", "0", "--out", str(out), "--quiet"]) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["model_config"]["spatial_dims"] == 1 and state["config"]["model"] == "densenet121"
