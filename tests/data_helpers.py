"""Writers of small datasets in the real file formats, for the data tests."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

SHARED_ZIP = Path(os.environ.get("DENSENET_CIFAR10_ZIP") or Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.zip")
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def random_cifar(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 3, 32, 32) uint8, labels (n,) covering every class when n >= classes)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), np.arange(n) % classes


def _tar(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as t:
        t.add(folder, arcname=folder.name)
    return archive


def write_cifar10_python(root: Path, n_per_batch: int = 20, n_test: int = 20, archive: bool = True) -> dict:
    """The official CIFAR-10 python release: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    pickled (protocol 2, bytes keys) as the release lays them out; returns the arrays written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = random_cifar(5 * n_per_batch, 10, 1)
    tx, ty = random_cifar(n_test, 10, 2)
    for i in range(5):
        sl = slice(i * n_per_batch, (i + 1) * n_per_batch)
        batch = {b"batch_label": f"training batch {i + 1} of 5".encode(), b"labels": [int(v) for v in ys[sl]],
                 b"data": xs[sl].reshape(-1, 3072), b"filenames": [b"x.png"] * n_per_batch}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in ty], b"data": tx.reshape(-1, 3072)}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    meta = {b"num_cases_per_batch": n_per_batch, b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    out = {"train_x": xs, "train_y": ys, "test_x": tx, "test_y": ty, "path": folder}
    if archive:
        out["path"] = _tar(folder, root / "cifar-10-python.tar.gz")
    return out


def write_cifar10_binary(root: Path, n_per_batch: int = 20, n_test: int = 20, archive: bool = True) -> dict:
    """The official CIFAR-10 binary release: cifar-10-batches-bin/ with 1 label byte + 3072 pixels per record."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    xs, ys = random_cifar(5 * n_per_batch, 10, 3)
    tx, ty = random_cifar(n_test, 10, 4)
    rec = lambda x, y: np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(x), -1)], 1).tobytes()  # noqa: E731
    for i in range(5):
        sl = slice(i * n_per_batch, (i + 1) * n_per_batch)
        (folder / f"data_batch_{i + 1}.bin").write_bytes(rec(xs[sl], ys[sl]))
    (folder / "test_batch.bin").write_bytes(rec(tx, ty))
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    (folder / "readme.html").write_text("<html></html>")
    out = {"train_x": xs, "train_y": ys, "test_x": tx, "test_y": ty, "path": folder}
    if archive:
        out["path"] = _tar(folder, root / "cifar-10-binary.tar.gz")
    return out


def cifar100_labels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    fine = np.arange(n) % 100
    return fine, fine // 5  # a coarse class = 5 fine classes


def write_cifar100(root: Path, fmt: str, n_train: int = 200, n_test: int = 100, archive: bool = True) -> dict:
    """The official CIFAR-100 release, ``fmt`` "python" (cifar-100-python/{train,test,meta}) or
    "binary" (cifar-100-binary/{train,test}.bin: coarse byte, fine byte, 3072 pixels)."""
    xs, _ = random_cifar(n_train, 100, 5)
    tx, _ = random_cifar(n_test, 100, 6)
    ys, cs = cifar100_labels(n_train, 0)
    ty, tc = cifar100_labels(n_test, 1)
    fine = [f"fine{i:02d}" for i in range(100)]
    coarse = [f"coarse{i:02d}" for i in range(20)]
    if fmt == "python":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name, x, y, c in (("train", xs, ys, cs), ("test", tx, ty, tc)):
            d = {b"filenames": [b"f.png"] * len(x), b"batch_label": name.encode(), b"fine_labels": [int(v) for v in y],
                 b"coarse_labels": [int(v) for v in c], b"data": x.reshape(-1, 3072)}
            (folder / name).write_bytes(pickle.dumps(d, protocol=2))
        meta = {b"fine_label_names": [n.encode() for n in fine], b"coarse_label_names": [n.encode() for n in coarse]}
        (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
        arch = "cifar-100-python.tar.gz"
    else:
        folder = root / "cifar-100-binary"
        folder.mkdir(parents=True)
        for name, x, y, c in (("train", xs, ys, cs), ("test", tx, ty, tc)):
            recs = np.concatenate([c.astype(np.uint8)[:, None], y.astype(np.uint8)[:, None], x.reshape(len(x), -1)], 1)
            (folder / f"{name}.bin").write_bytes(recs.tobytes())
        (folder / "fine_label_names.txt").write_text("\n".join(fine) + "\n")
        (folder / "coarse_label_names.txt").write_text("\n".join(coarse) + "\n")
        arch = "cifar-100-binary.tar.gz"
    out = {"train_x": xs, "train_y": ys, "train_coarse": cs, "test_x": tx, "test_y": ty, "test_coarse": tc,
           "fine": fine, "coarse": coarse, "path": folder}
    if archive:
        out["path"] = _tar(folder, root / arch)
    return out


def write_svhn(root: Path, n: dict | None = None) -> dict:
    """SVHN format 2: {train,test,extra}_32x32.mat with X (32, 32, 3, N) uint8 and y (N, 1) in 1..10."""
    n = n or {"train": 30, "test": 20, "extra": 50}
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (split, k) in enumerate(n.items()):
        rng = np.random.default_rng(10 + i)
        x = rng.integers(0, 256, (32, 32, 3, k), dtype=np.uint8)
        y = (np.arange(k) % 10 + 1).reshape(k, 1).astype(np.uint8)  # 1..10; 10 is digit 0
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (x.transpose(3, 2, 0, 1), y.reshape(-1) % 10)
    return out


def image_bytes(fmt: str, size: tuple[int, int] = (32, 32), mode: str = "RGB", seed: int = 0) -> bytes:
    """An encoded image of ``mode`` (RGB, L, CMYK, RGBA, P, I;16) in format ``fmt`` (PNG, JPEG, ...)."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))
    elif mode == "P":
        im = rgb.convert("P")
    else:
        im = rgb.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def write_image_tree(root: Path, spec: dict[str, dict[str, int]], size=(32, 32), fmt: str = "PNG", as_zip: bool = False) -> Path:
    """split -> class -> image count, as split/class/NNNN.png in a folder (or a zip when ``as_zip``);
    images are distinct random RGB images. An empty split name puts classes at the top."""
    files = {}
    k = 0
    for split, classes in spec.items():
        for cls, n in classes.items():
            for i in range(n):
                name = f"{split}/{cls}/{i:04d}.{fmt.lower()}" if split else f"{cls}/{i:04d}.{fmt.lower()}"
                files[name] = image_bytes(fmt, size, seed=k)
                k += 1
    if as_zip:
        root.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root, "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
        return root
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def unnormalise(x, mean, std) -> np.ndarray:
    """float32 normalised images -> the uint8 pixels they came from (rounded)."""
    import torch

    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    return (x * s + m).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
