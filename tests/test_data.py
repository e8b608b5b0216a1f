"""densenet.data readers on files in the real formats, written here: CIFAR binary and python releases
(archives and folders), SVHN .mat, image folders and zips, the shared CIFAR-10 JPEG zip; and every
bad-input case raising a clear DataError."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import (
    CIFAR10_NAMES,
    SHARED_ZIP,
    image_bytes,
    unnormalise,
    write_cifar10_binary,
    write_cifar10_python,
    write_cifar100,
    write_image_tree,
    write_svhn,
)

import densenet.data.build as build_mod
from densenet.data import DATASETS, DataError, build_data, safe_extract
from densenet.data.cache import cache_path, load_arrays, save_arrays
from densenet.data.download import download, md5sum
from densenet.data.safe_pickle import safe_loads


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test gets its own cache directory (never ~/.cache)."""
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))


def all_images(loader, **kw) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(unnormalise(x, loader.mean, loader.std), y.numpy()) for x, y in loader.batches(0, **kw)])
    return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------------------------- names
def test_dataset_names_and_unknown_name():
    assert DATASETS == ("cifar10", "cifar10+", "cifar100", "cifar100+", "svhn", "imagenet", "folder", "csv", "volumes", "signals")
    with pytest.raises(DataError, match="valid names: cifar10, cifar10\\+, cifar100.*folder"):
        build_data("cifar11", None)
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------------- CIFAR-10
@pytest.mark.parametrize("writer", [write_cifar10_python, write_cifar10_binary])
@pytest.mark.parametrize("where", ["archive", "dir_with_archive", "extracted", "parent_of_extracted"])
def test_cifar10_official_releases(tmp_path, writer, where):
    w = writer(tmp_path / "src", archive=where in ("archive", "dir_with_archive"))
    root = {"archive": w["path"], "dir_with_archive": w["path"].parent, "extracted": w["path"],
            "parent_of_extracted": w["path"].parent}[where]
    data = build_data("cifar10", root, batch_size=16, eval_batch_size=7)
    assert data.num_classes == 10 and data.class_names == CIFAR10_NAMES and data.image_size == 32
    assert data.train.num_images == 100 and data.test.num_images == 20 and data.val is None
    x, y = all_images(data.test)
    np.testing.assert_array_equal(x, w["test_x"])
    np.testing.assert_array_equal(y, w["test_y"])
    x, y = all_images(data.train)  # shuffled, no augmentation: the same images in another order
    order = np.argsort([bytes(a.tobytes()) for a in x])
    ref = np.argsort([bytes(a.tobytes()) for a in w["train_x"][:len(x)]])
    assert len(x) == 96  # drop_last: 100 // 16 batches of 16
    got = {a.tobytes(): int(b) for a, b in zip(x, y)}
    want = {a.tobytes(): int(b) for a, b in zip(w["train_x"], w["train_y"])}
    assert all(want[k] == v for k, v in got.items()) and len(got) == 96 and len(order) == len(ref)
    # normalisation: the training images' per-channel statistics
    m = w["train_x"].astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255
    np.testing.assert_allclose(data.mean, m.mean(1), rtol=1e-9)
    np.testing.assert_allclose(data.std, m.std(1), rtol=1e-9)


def test_cifar_python_and_binary_decode_identically(tmp_path):
    p = write_cifar10_python(tmp_path / "p")
    root = tmp_path / "b" / "cifar-10-batches-bin"
    root.mkdir(parents=True)
    for i in range(5):  # the same images written in the binary format
        sl = slice(i * 20, (i + 1) * 20)
        rec = np.concatenate([p["train_y"][sl].astype(np.uint8)[:, None], p["train_x"][sl].reshape(20, -1)], 1)
        (root / f"data_batch_{i + 1}.bin").write_bytes(rec.tobytes())
    rec = np.concatenate([p["test_y"].astype(np.uint8)[:, None], p["test_x"].reshape(20, -1)], 1)
    (root / "test_batch.bin").write_bytes(rec.tobytes())
    (root / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES))
    a, b = build_data("cifar10+", p["path"], batch_size=10), build_data("cifar10+", root, batch_size=10)
    for (xa, ya), (xb, yb) in zip(a.train.batches(3), b.train.batches(3)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ----------------------------------------------------------------------------------- CIFAR-100
@pytest.mark.parametrize("fmt", ["python", "binary"])
@pytest.mark.parametrize("archive", [True, False])
def test_cifar100_fine_and_coarse(tmp_path, fmt, archive):
    w = write_cifar100(tmp_path, fmt, archive=archive)
    data = build_data("cifar100", w["path"], batch_size=50)
    assert data.num_classes == 100 and data.class_names == w["fine"]
    x, y = all_images(data.test)
    np.testing.assert_array_equal(x, w["test_x"])
    np.testing.assert_array_equal(y, w["test_y"])
    coarse = build_data("cifar100", w["path"], batch_size=50, coarse_labels=True)
    assert coarse.num_classes == 20 and coarse.class_names == w["coarse"]
    np.testing.assert_array_equal(all_images(coarse.test)[1], w["test_coarse"])


def test_cifar100_archive_is_not_cifar10(tmp_path):
    w = write_cifar100(tmp_path, "python")
    with pytest.raises(DataError, match="not a cifar10 archive.*cifar-10-batches-py"):
        build_data("cifar10", w["path"])


# ----------------------------------------------------------------------------------- safety of pickles
class _WritesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class _RunsShell:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", [_WritesFile, _RunsShell])
def test_pickle_that_would_create_a_file_is_refused(tmp_path, payload):
    w = write_cifar10_python(tmp_path / "src", archive=False)
    evil = tmp_path / "pwned.txt"
    batch = {b"labels": [0] * 20, b"data": np.zeros((20, 3072), np.uint8), b"x": payload(evil)}
    (w["path"] / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="data_batch_2: refused: the pickle holds something other than plain data"):
        build_data("cifar10", w["path"])
    assert not evil.exists()
    # the same inside an archive
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as t:
        t.add(w["path"], arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match="refused"):
        build_data("cifar10", tmp_path / "cifar-10-python.tar.gz")
    assert not evil.exists()


def test_safe_loads_admits_plain_data_only():
    plain = {b"a": [1, 2.5, "s", b"b", (None, True)], "arr": np.arange(6, dtype=np.int16).reshape(2, 3)}
    for protocol in (2, 4, 5):
        out = safe_loads(pickle.dumps(plain, protocol=protocol), "x")
        assert out[b"a"] == plain[b"a"] and np.array_equal(out["arr"], plain["arr"])
    for bad in ({1, 2}, np.array([object()], dtype=object), torch.zeros(2), {"f": len}):
        with pytest.raises(DataError, match="x: refused"):
            safe_loads(pickle.dumps(bad, protocol=2), "x")
    with pytest.raises(DataError, match="x: truncated or corrupt pickle"):
        safe_loads(pickle.dumps(plain, protocol=2)[:50], "x")


# ----------------------------------------------------------------------------------- CIFAR bad input
def test_missing_cifar_lists_expected_files(tmp_path):
    with pytest.raises(DataError) as e:
        build_data("cifar10", tmp_path)
    msg = str(e.value)
    for expected in ("cifar-10-python.tar.gz", "cifar-10-binary.tar.gz", "data_batch_1", "test_batch",
                     "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"):
        assert expected in msg
    with pytest.raises(DataError, match="no such file"):
        build_data("cifar100", tmp_path / "nowhere")
    with pytest.raises(DataError, match="bundled sample is CIFAR-10 only"):
        build_data("cifar100", None)


def test_misnamed_file_in_extracted_folder(tmp_path):
    w = write_cifar10_python(tmp_path, archive=False)
    (w["path"] / "data_batch_3").rename(w["path"] / "data_batch_3.pkl")
    with pytest.raises(DataError, match="missing data_batch_3 .*data_batch_1, data_batch_2, data_batch_3"):
        build_data("cifar10", w["path"])


def test_archive_missing_member(tmp_path):
    w = write_cifar10_binary(tmp_path, archive=False)
    (w["path"] / "test_batch.bin").unlink()
    arch = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(arch, "w:gz") as t:
        t.add(w["path"], arcname="cifar-10-batches-bin")
    with pytest.raises(DataError, match=f"{arch}: archive lacks test_batch.bin"):
        build_data("cifar10", arch)


def test_truncated_archive(tmp_path):
    w = write_cifar10_python(tmp_path / "src")
    cut = tmp_path / "cifar-10-python.tar.gz"
    cut.write_bytes(w["path"].read_bytes()[: w["path"].stat().st_size // 2])
    with pytest.raises(DataError, match=f"{cut}: truncated or corrupt archive"):
        build_data("cifar10", cut)


def test_truncated_binary_record_and_corrupt_pickle(tmp_path):
    w = write_cifar10_binary(tmp_path / "b", archive=False)
    f = w["path"] / "data_batch_4.bin"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match="data_batch_4.bin: .* not a whole number of 3073-byte records"):
        build_data("cifar10", w["path"])
    w = write_cifar10_python(tmp_path / "p", archive=False)
    f = w["path"] / "test_batch"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(DataError, match="test_batch: truncated or corrupt pickle"):
        build_data("cifar10", w["path"])
    batch = {b"labels": [0] * 3, b"data": np.zeros((3, 100), np.uint8)}  # wrong record size
    (w["path"] / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="test_batch: not a CIFAR python batch.*uint8 \\(N, 3072\\)"):
        build_data("cifar10", w["path"])


@pytest.mark.parametrize("fmt", ["binary", "python"])
def test_labels_out_of_range(tmp_path, fmt):
    if fmt == "binary":
        w = write_cifar10_binary(tmp_path, archive=False)
        f = w["path"] / "data_batch_1.bin"
        b = bytearray(f.read_bytes())
        b[3073 * 5] = 10  # label byte of record 5
        f.write_bytes(bytes(b))
    else:
        w = write_cifar10_python(tmp_path, archive=False)
        d = pickle.loads((w["path"] / "data_batch_1").read_bytes())
        d[b"labels"][5] = 10
        (w["path"] / "data_batch_1").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(DataError, match="data_batch_1.*label 10 of record 5 is out of range 0..9"):
        build_data("cifar10", w["path"])


# ----------------------------------------------------------------------------------- archive safety
def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as t:
        member.size = len(data) if member.isfile() else 0
        t.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil-abs.txt", "cifar-10-batches-py/../../evil.txt"])
def test_unsafe_member_names_refused(tmp_path, name):
    arch = _tar_with(tmp_path / "a.tar.gz", tarfile.TarInfo(name))
    with pytest.raises(DataError, match="refused member .*unsafe archive"):
        build_data("cifar10", arch)
    with pytest.raises(DataError, match="refused member"):
        safe_extract(arch, tmp_path / "out")
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr(name, b"x")
    with pytest.raises(DataError, match="refused member"):
        safe_extract(z, tmp_path / "out")
    with pytest.raises(DataError, match="refused member"):
        build_data("folder", z)
    assert not (tmp_path / "evil.txt").exists() and not list(tmp_path.rglob("evil*"))


def test_links_in_archives_refused(tmp_path):
    link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    arch = _tar_with(tmp_path / "cifar-10-python.tar.gz", link)
    with pytest.raises(DataError, match="links and special files are not allowed"):
        build_data("cifar10", arch)
    with pytest.raises(DataError, match="links"):
        safe_extract(arch, tmp_path / "out")
    assert not (tmp_path / "out" / "cifar-10-batches-py" / "data_batch_1").exists()


def test_safe_extract_extracts_and_release_reads_back(tmp_path):
    w = write_cifar10_python(tmp_path / "src")
    out = safe_extract(w["path"], tmp_path / "x")
    data = build_data("cifar10", out)
    np.testing.assert_array_equal(all_images(data.test)[0], w["test_x"])


# ----------------------------------------------------------------------------------- SVHN
def test_svhn_mat_files(tmp_path):
    w = write_svhn(tmp_path)
    data = build_data("svhn", tmp_path, batch_size=10, eval_batch_size=8)
    assert data.num_classes == 10 and data.class_names == [str(i) for i in range(10)]
    assert data.mean == (0, 0, 0) and data.std == (1, 1, 1)
    assert data.train.num_images == 80 and data.test.num_images == 20  # train + extra
    x, y = zip(*data.test.batches(0))
    x, y = torch.cat(x), torch.cat(y)
    np.testing.assert_allclose(x.numpy(), w["test"][0] / 255.0, atol=1e-6)  # pixels / 255, nothing else
    np.testing.assert_array_equal(y, w["test"][1])
    assert 0 in set(y.tolist()) and 10 not in set(y.tolist())  # label 10 is digit 0
    seen = {a.tobytes(): int(b) for xb, yb in data.train.batches(0) for a, b in zip(all_u8(xb), yb)}
    ref = {a.tobytes(): int(b) for s in ("train", "extra") for a, b in zip(*w[s])}
    assert len(seen) == 80 and all(ref[k] == v for k, v in seen.items())
    v = build_data("svhn", tmp_path, batch_size=10, val_size=6)
    assert v.val.num_images == 6 and v.train.num_images == 74


def all_u8(x: torch.Tensor) -> np.ndarray:
    return x.mul(255).round().to(torch.uint8).numpy()


def test_svhn_errors_are_told_apart_by_type_not_by_message_text(tmp_path):
    """A damaged file in a folder whose name holds words of other errors ("zip bomb", "file missing")
    is still reported as damaged; a missing file and a refused expansion keep their own types."""
    from densenet.data import DataNotFound, ExpansionRefused
    from densenet.data.archive import check_expansion
    from densenet.data.svhn import read_svhn_mat

    folder = tmp_path / "zip bomb file missing"
    folder.mkdir()
    (folder / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 50)
    with pytest.raises(DataError, match="train_32x32.mat: not a readable MATLAB file, truncated or corrupt"):
        read_svhn_mat(folder / "train_32x32.mat")
    with pytest.raises(DataNotFound, match="test_32x32.mat: file missing"):
        read_svhn_mat(folder / "test_32x32.mat")
    with pytest.raises(ExpansionRefused, match="possible zip bomb"):
        check_expansion("a.mat", "variable X", 10**9, 10)


def test_svhn_bad_input(tmp_path):
    write_svhn(tmp_path)
    (tmp_path / "extra_32x32.mat").unlink()
    with pytest.raises(DataError, match="missing extra_32x32.mat.*train_32x32.mat, extra_32x32.mat, test_32x32.mat"):
        build_data("svhn", tmp_path)
    import scipy.io

    scipy.io.savemat(tmp_path / "extra_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[3], [11]])})
    with pytest.raises(DataError, match="extra_32x32.mat: label 11 of image 1 is out of range 1..10"):
        build_data("svhn", tmp_path)
    (tmp_path / "extra_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 50)
    with pytest.raises(DataError, match="extra_32x32.mat: not a readable MATLAB file"):
        build_data("svhn", tmp_path)
    scipy.io.savemat(tmp_path / "extra_32x32.mat", {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": np.array([[3], [1]])})
    with pytest.raises(DataError, match="extra_32x32.mat: X is uint8 \\(28, 28, 1, 2\\), expected"):
        build_data("svhn", tmp_path)


# ----------------------------------------------------------------------------------- cache
def test_cache_written_once_reused_and_refreshed(tmp_path, monkeypatch):
    w = write_cifar10_python(tmp_path / "src")
    cdir = tmp_path / "c"
    a = build_data("cifar10", w["path"], cache_dir=cdir)
    files = list(cdir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz" and "cache" in a.source
    assert isinstance(a.test.x, np.memmap)  # memory-mapped

    def fail(*args, **kw):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(build_mod, "read_cifar", fail)
    b = build_data("cifar10", w["path"], cache_dir=cdir)
    np.testing.assert_array_equal(all_images(b.test)[0], w["test_x"])
    monkeypatch.undo()
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))
    # a changed source is imported again
    w2 = write_cifar10_python(tmp_path / "src2")
    os.replace(w2["path"], w["path"])
    os.utime(w["path"], ns=(1, 1))
    c = build_data("cifar10", w["path"], cache_dir=cdir)
    assert len(list(cdir.iterdir())) == 2
    np.testing.assert_array_equal(all_images(c.test)[0], w2["test_x"])
    # a damaged cache file is rebuilt
    cur = cache_path("cifar10-archive", [w["path"]], cdir)
    cur.write_bytes(cur.read_bytes()[:100])
    d = build_data("cifar10", w["path"], cache_dir=cdir)
    np.testing.assert_array_equal(all_images(d.test)[0], w2["test_x"])
    assert not [f for f in cdir.iterdir() if f.suffix == ".tmp"]


def test_cache_round_trip_and_env(tmp_path, monkeypatch):
    arrays = {"x": np.arange(24, dtype=np.uint8).reshape(2, 3, 2, 2), "names": np.asarray(["a", "bc"]), "e": np.zeros((0, 3))}
    p = save_arrays(tmp_path / "d" / "t.npz", arrays)
    for mmap in (True, False):
        out = load_arrays(p, mmap=mmap)
        assert all(np.array_equal(out[k], v) for k, v in arrays.items())
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "env"))
    assert cache_path("k", [p]).parent == tmp_path / "env"


# ----------------------------------------------------------------------------------- download
class _Resp(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def test_download_verifies_md5_offline_message(tmp_path, monkeypatch):
    import hashlib
    import urllib.request

    import densenet.data.download as dl

    w = write_cifar10_python(tmp_path / "src")
    payload = w["path"].read_bytes()
    monkeypatch.setitem(dl.RESOURCES, "cifar10", [("cifar-10-python.tar.gz", "https://example.invalid/c10.tgz",
                                                    hashlib.md5(payload).hexdigest())])
    urls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: urls.append(url) or _Resp(payload))
    data = build_data("cifar10", tmp_path / "dl", download=True)
    assert urls == ["https://example.invalid/c10.tgz"] and data.test.num_images == 20
    assert md5sum(tmp_path / "dl" / "cifar-10-python.tar.gz") == hashlib.md5(payload).hexdigest()
    download("cifar10", tmp_path / "dl")  # present with the right MD5: not fetched again
    assert len(urls) == 1
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Resp(payload[:-1] + b"!"))
    with pytest.raises(DataError, match="MD5 .* expected"):
        download("cifar10", tmp_path / "dl2")
    assert not list((tmp_path / "dl2").iterdir())  # nothing half-written left

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="offline\\? Put cifar-10-python.tar.gz from https://example.invalid/c10.tgz .* in"):
        build_data("cifar10+", tmp_path / "dl3", download=True)
    with pytest.raises(DataError, match="cannot be downloaded: Put the ImageNet"):
        download("imagenet", tmp_path)


# ----------------------------------------------------------------------------------- bundled sample
@pytest.mark.parametrize("root", [None, "sample"])
def test_bundled_sample(root):
    data = build_data("cifar10+", root, batch_size=100)
    assert data.class_names == CIFAR10_NAMES and data.num_classes == 10
    assert (data.train.num_images, data.test.num_images) == (1000, 200)
    assert np.bincount(data.train.y, minlength=10).tolist() == [100] * 10
    assert np.bincount(data.test.y, minlength=10).tolist() == [20] * 10
    assert build_mod.SAMPLE_PATH.stat().st_size < 3_000_000
    x, y = next(data.train.batches(0))
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(data.mean[0] - 0.49) < 0.03 and abs(data.std[0] - 0.245) < 0.03


# ----------------------------------------------------------------------------------- image folders
def test_image_tree_cifar10_folder_and_zip(tmp_path):
    spec = {s: {c: n for c in CIFAR10_NAMES} for s, n in (("train", 3), ("test", 2))}
    d = build_data("cifar10", write_image_tree(tmp_path / "tree", spec, fmt="PNG"), batch_size=5)
    z = build_data("cifar10", write_image_tree(tmp_path / "tree.zip", spec, fmt="PNG", as_zip=True), batch_size=5)
    assert d.class_names == z.class_names == CIFAR10_NAMES and d.train.num_images == 30
    xd, yd = all_images(d.test)
    xz, yz = all_images(z.test)
    np.testing.assert_array_equal(xd, xz)
    np.testing.assert_array_equal(yd, [i // 2 for i in range(20)])
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / "tree/test/airplane/0000.png")).transpose(2, 0, 1)
    np.testing.assert_array_equal(xd[0], first)


def test_image_tree_32_bad_images(tmp_path):
    spec = {s: {c: 2 for c in "ab"} for s in ("train", "test")}
    root = write_image_tree(tmp_path / "t", spec)
    (root / "train/b/0001.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="train/b/0001.png: cannot decode image"):
        build_data("cifar10", root)
    data = build_data("cifar10", root, skip_bad_images=True)
    assert data.train.num_images == 3 and len(data.skipped) == 1 and "0001.png" in data.skipped[0]
    (root / "train/a/0000.png").write_bytes(image_bytes("PNG", (33, 32)))
    with pytest.raises(DataError, match="train/a/0000.png: image is 33x32, expected 32x32"):
        build_data("cifar10", root)
    with pytest.raises(DataError, match="expected both train/<class>/ and test/<class>/"):
        build_data("cifar10", write_image_tree(tmp_path / "only.zip", {"train": {"a": 1}}, as_zip=True))


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("I;16", "PNG"),
                                      ("RGB", "BMP"), ("RGB", "WEBP"), ("LA", "PNG"), ("RGB", "TIFF")])
def test_folder_image_modes_become_rgb(tmp_path, mode, fmt):
    for split in ("train", "val"):
        for c in ("x", "y"):
            p = tmp_path / split / c / f"im.{fmt.lower()}"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(image_bytes(fmt, (40, 30), mode))
    data = build_data("folder", tmp_path, image_size=32, batch_size=2, workers=0)
    x, y = next(data.test.batches(0))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]
    x, _ = next(data.train.batches(0))
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()


def test_folder_bad_input(tmp_path):
    root = write_image_tree(tmp_path / "f", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    (root / "train/c").mkdir()
    with pytest.raises(DataError, match="empty class folder\\(s\\) in train/: c"):
        build_data("folder", root)
    (root / "train/c").rmdir()
    (root / "val/b/0000.png").unlink()
    (root / "val/b").rmdir()
    (root / "val/c").mkdir()
    (root / "val/c/x.png").write_bytes(image_bytes("PNG"))
    with pytest.raises(DataError, match="class folders of val/ and train/ differ: b, c"):
        build_data("folder", root)
    with pytest.raises(DataError, match="ImageNet needs train/<wnid>/\\*.JPEG and val/<wnid>/"):
        build_data("imagenet", write_image_tree(tmp_path / "in", {"train": {"a": 1}}))
    (write_image_tree(tmp_path / "n", {"val": {"a": 1}}) / "train").mkdir()
    with pytest.raises(DataError, match="n: train/ holds no class folders"):
        build_data("folder", tmp_path / "n")
    with pytest.raises(DataError, match="no such file"):
        build_data("imagenet", tmp_path / "none")
    with pytest.raises(DataError, match="needs root"):
        build_data("imagenet", None)


def test_folder_undecodable_images_named_or_skipped(tmp_path):
    root = write_image_tree(tmp_path / "f.zip", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}}, as_zip=True)
    with zipfile.ZipFile(root, "a") as z:
        z.writestr("train/b/9999.png", image_bytes("PNG")[:60])  # truncated
    data = build_data("folder", root, image_size=32, batch_size=9, workers=1)
    with pytest.raises(DataError, match="f.zip:train/b/9999.png: cannot decode image"):
        list(data.train.batches(0))
    data = build_data("folder", root, image_size=32, batch_size=9, workers=1, skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipped 1 undecodable image"):
        (x, y), = list(data.train.batches(0))
    assert len(x) == 8 and data.train.skipped == {f"{root}:train/b/9999.png"}


def test_decompression_bomb_limit(tmp_path):
    root = write_image_tree(tmp_path / "f", {"train": {"a": 1}, "val": {"a": 1}}, size=(200, 100))
    data = build_data("folder", root, image_size=32, batch_size=1, workers=0, max_image_pixels=10_000)
    with pytest.raises(DataError, match="200x100 image exceeds the limit of 10,000 pixels"):
        list(data.test.batches(0))
    ok = build_data("folder", root, image_size=32, batch_size=1, workers=0, max_image_pixels=20_000)
    assert len(list(ok.test.batches(0))) == 1


def test_folder_single_tree_split_by_fraction(tmp_path):
    root = write_image_tree(tmp_path / "f", {"": {"cat": 10, "dog": 10, "eel": 10}})
    data = build_data("folder", root, image_size=32, batch_size=4, val_fraction=0.2, workers=0, seed=5)
    assert data.class_names == ["cat", "dog", "eel"] and data.num_classes == 3
    assert data.test.num_images == 6 and data.train.num_images == 24
    assert not set(data.test.indices) & set(data.train.indices)
    other = build_data("folder", root, image_size=32, val_fraction=0.2, workers=0, seed=6)
    assert set(other.test.indices) != set(data.test.indices)
    with pytest.raises(DataError, match="val_fraction must be in"):
        build_data("folder", root, val_fraction=1.5)


def test_folder_with_val_and_test(tmp_path):
    root = write_image_tree(tmp_path / "f", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}, "test": {"a": 3, "b": 3}})
    data = build_data("folder", root, image_size=32, workers=0)
    assert data.val.num_images == 2 and data.test.num_images == 6 and data.image_size == 32
    assert data.mean == build_mod.IMAGENET_MEAN


# ----------------------------------------------------------------------------------- the shared JPEG zip
need_shared = pytest.mark.skipif(not SHARED_ZIP.is_file(), reason=f"shared CIFAR-10 JPEG zip not found at {SHARED_ZIP}")


@need_shared
def test_shared_zip_read_directly_as_folder():
    data = build_data("folder", SHARED_ZIP, image_size=32, batch_size=50, workers=2, train_subset=200, test_subset=100)
    assert data.class_names == CIFAR10_NAMES and data.train.tree.is_zip
    assert len(data.train.tree) == 50_000 and len(data.test.tree) == 10_000
    batches = list(data.test.batches(0))
    assert sum(len(y) for _, y in batches) == 100 and batches[0][0].shape == (50, 3, 32, 32)


@need_shared
@pytest.mark.slow
def test_shared_zip_imported_into_cache(tmp_path):
    data = build_data("cifar10+", SHARED_ZIP, cache_dir=tmp_path, val_size=5000, seed=1)
    assert data.class_names == CIFAR10_NAMES
    assert (data.train.num_images, data.val.num_images, data.test.num_images) == (45_000, 5_000, 10_000)
    assert np.bincount(data.test.y).tolist() == [1000] * 10
    assert np.bincount(data.train.y).tolist() == [5000] * 10
    np.testing.assert_allclose(data.mean, (0.49, 0.48, 0.447), atol=0.005)
    np.testing.assert_allclose(data.std, (0.246, 0.244, 0.262), atol=0.005)
    assert not set(data.val.indices) & set(data.train.indices)
    # pixel-exact against a direct decode of one member
    from PIL import Image

    with zipfile.ZipFile(SHARED_ZIP) as z:
        ref = np.asarray(Image.open(io.BytesIO(z.read("test/cat/0007.jpg"))).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(data.test.x[3 * 1000 + 7], ref)
    again = build_data("cifar10", SHARED_ZIP, cache_dir=tmp_path)  # from the cache now
    assert len(list(tmp_path.iterdir())) == 1 and again.test.num_images == 10_000


@need_shared
def test_bundled_sample_is_the_first_images_of_the_shared_zip(tmp_path):
    from densenet.data.make_sample import make_sample

    with zipfile.ZipFile(build_mod.SAMPLE_PATH) as s, zipfile.ZipFile(SHARED_ZIP) as z:
        names = s.namelist()
        assert len(names) == 1200
        assert {n.rsplit("/", 1)[-1] for n in names if n.startswith("train/")} == {f"{i:04d}.jpg" for i in range(100)}
        assert {n.rsplit("/", 1)[-1] for n in names if n.startswith("test/")} == {f"{i:04d}.jpg" for i in range(20)}
        for n in names[::37]:
            assert s.read(n) == z.read(n)
    rebuilt = make_sample(SHARED_ZIP, tmp_path / "s.zip")  # the committed file is what the script makes
    assert rebuilt.read_bytes() == build_mod.SAMPLE_PATH.read_bytes()


def test_safe_loads_pickle_nesting_limit_is_exact():
    """Objects nested 50 levels below the top are admitted, 51 levels refused (a bound on the check's
    recursion), with dicts and lists at even and at odd depths."""
    from densenet.data.safe_pickle import safe_loads

    def nested(levels: int, dict_first: bool):
        obj: object = 1
        for i in range(levels):
            obj = {"k": obj} if (i % 2 == 0) == dict_first else [obj]
        return obj

    for dict_first in (True, False):
        assert safe_loads(pickle.dumps(nested(50, dict_first), protocol=2), "x") == nested(50, dict_first)
        with pytest.raises(DataError, match="x: refused: .*refused object of type"):
            safe_loads(pickle.dumps(nested(51, dict_first), protocol=2), "x")


def test_safe_loads_pickle_checks_dict_keys_and_values_inside_containers():
    """Objects the unpickler builds without any global (sets, frozensets: protocol 4 opcodes) are refused
    wherever they are: dict values, dict keys, nested tuples used as keys."""
    from densenet.data.safe_pickle import safe_loads

    for bad in [{"k": {1, 2}}, {frozenset({1}): 1}, [{"a": [frozenset()]}], ({"x": 1}, {2: set()})]:
        with pytest.raises(DataError, match="x: refused: .*refused object of type"):
            safe_loads(pickle.dumps(bad, protocol=4), "x")

    def deep(depth: int, key_levels: int):  # a dict at ``depth`` whose key nests ``key_levels`` tuples
        key: object = 0
        for _ in range(key_levels):
            key = (key,)
        obj: object = {key: 1}
        for _ in range(depth):
            obj = [obj]
        return obj

    for depth in (40, 41):  # the dict at an even and an odd depth
        assert safe_loads(pickle.dumps(deep(depth, 49 - depth), protocol=2), "x") == deep(depth, 49 - depth)  # 0 at depth 50
        with pytest.raises(DataError, match="x: refused"):
            safe_loads(pickle.dumps(deep(depth, 50 - depth), protocol=2), "x")  # at depth 51
