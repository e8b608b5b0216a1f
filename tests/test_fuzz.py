"""Fuzzing every reader with hypothesis (issue 8, point 8): random bytes, mutated valid files
(truncations, byte flips, insertions, deletions) and generated structures with wrong shapes and
types. Only the project's own errors may come out (DataError, CheckpointError, WeightsError,
ConfigError), never another exception, a crash or a hang (an example running past 30 s fails).

CI runs a bounded number of cases per reader, the same ones every time (``derandomize``); the slow
variant runs 5x as many. Each test prints how many cases it tried and what came out of them. For a
longer search with fresh random cases: ``DENSENET_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py -k reader -s``.
"""
from __future__ import annotations

import collections
import gzip
import io
import os
import pickle
import random
import signal
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import yaml
from data_helpers import (
    image_bytes,
    write_cifar10_binary,
    write_cifar10_python,
    write_cifar100,
    write_image_tree,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from densenet import WeightsError, read_state_dict
from densenet.data import DataError, build_data, decode_image
from densenet.data.cache import load_arrays, save_arrays
from densenet.data.cifar import find_cifar, read_cifar
from densenet.data.matfile import read_mat_arrays
from densenet.data.svhn import read_svhn_mat
from densenet.data.volumes import read_signal, read_volume
from densenet.io.checkpoint import (
    CheckpointError,
    content_digest,
    load_checkpoint,
    save_checkpoint,
)
from densenet.training.config import ConfigError, TrainConfig, resolve_config

EXAMPLES = int(os.environ.get("DENSENET_FUZZ_EXAMPLES", "100"))  # per reader (100 in CI)
FRESH = "DENSENET_FUZZ_EXAMPLES" in os.environ
VERBOSE = bool(os.environ.get("DENSENET_FUZZ_VERBOSE"))  # print every error that came out
SLOW_FACTOR = 5
MAX_PIXELS = 4_000_000  # keeps mutated image headers from allocating large images
TIME_LIMIT = 30  # seconds per example: longer is a hang


class Hang(BaseException):
    """An example ran past TIME_LIMIT (a BaseException, so that no reader's `except Exception` hides it)."""


def _alarm(signum, frame):
    raise Hang(f"an example ran longer than {TIME_LIMIT} s")


# ----------------------------------------------------------------------------------- mutations
@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``original`` with 1-4 edits (bit flips, byte changes, truncation, insertion, deletion, overwrite,
    duplication) at positions spread over the file, a third of them in its first 256 bytes (headers)."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))  # uniform positions, reproducible from the seed
    data = bytearray(original)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 4])):
        if not data:
            data += rng.randbytes(rng.randint(1, 64))
            continue
        pos = rng.randrange(min(256, len(data))) if rng.random() < 0.33 else rng.randrange(len(data))
        op = rng.choice(["bit", "bit", "byte", "truncate", "insert", "delete", "overwrite", "duplicate"])
        if op == "bit":
            data[pos] ^= 1 << rng.randrange(8)
        elif op == "byte":
            data[pos] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 32))
        elif op == "delete":
            del data[pos:pos + rng.randint(1, 256)]
        elif op == "overwrite":
            chunk = rng.randbytes(rng.randint(1, 16))
            data[pos:pos + len(chunk)] = chunk
        else:
            data[pos:pos] = data[pos:pos + rng.randint(1, 512)]
    return bytes(data)


def damaged(original: bytes) -> st.SearchStrategy[bytes]:
    """Mostly mutations of ``original``; sometimes random bytes."""
    return st.one_of(mutated(original), mutated(original), mutated(original), st.binary(max_size=2048))


plain = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**80), 2**80), st.floats(), st.text(max_size=20),
              st.binary(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=8)),
                                                                          inner, max_size=5)),
    max_leaves=20,
)


@st.composite
def arrays(draw) -> np.ndarray:
    dtype = draw(st.sampled_from([np.uint8, np.int64, np.float32, np.float64, np.int8, np.uint16, np.bool_]))
    shape = draw(st.lists(st.integers(0, 40), max_size=4))
    if draw(st.booleans()):  # often the right shapes
        shape = draw(st.sampled_from([[3, 3072], [32, 32, 3, 3], [3, 1], [3], [32, 32, 3]]))
    n = int(np.prod(shape)) if shape else 1
    values = np.frombuffer(draw(st.binary(min_size=n * np.dtype(dtype).itemsize, max_size=n * np.dtype(dtype).itemsize)),
                           dtype=np.uint8) if n * np.dtype(dtype).itemsize else np.zeros(0, np.uint8)
    return values.view(dtype).reshape(shape) if n else np.zeros(shape, dtype)


# ----------------------------------------------------------------------------------- the harness
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def run_fuzz(reader: str, strategy: st.SearchStrategy, check, allowed: tuple[type[BaseException], ...], examples: int) -> None:
    """Feed ``check`` the examples of ``strategy``; only ``allowed`` errors may come out of it."""
    counts = COUNTS[reader]
    counts.clear()
    slowest = [0.0]

    @settings(max_examples=examples, deadline=None, derandomize=not FRESH, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(strategy)
    def one(example) -> None:
        counts["cases"] += 1
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(TIME_LIMIT)
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                check(example, Path(tmp))
            counts["read"] += 1
        except allowed as e:
            counts[type(e).__name__] += 1
            if VERBOSE:
                print(f"  {type(e).__name__}: {str(e)[-160:]}")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            slowest[0] = max(slowest[0], time.perf_counter() - start)

    one()
    print(f"\nfuzz {reader}: {counts['cases']} cases; outcomes: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "cases") + f"; slowest {slowest[0]:.2f} s")
    assert counts["cases"] >= min(examples, 20)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict:
    """Small valid files of every format, to mutate."""
    root = tmp_path_factory.mktemp("seeds")
    s: dict = {}
    w = write_cifar10_binary(root / "bin", n_per_batch=2, n_test=2, archive=False)
    s["cifar10_binary"] = {p.name: p.read_bytes() for p in w["path"].iterdir()}
    w = write_cifar100(root / "bin100", "binary", n_train=4, n_test=2, archive=False)
    s["cifar100_binary"] = {p.name: p.read_bytes() for p in w["path"].iterdir()}
    w = write_cifar10_python(root / "py", n_per_batch=2, n_test=2, archive=False)
    s["cifar10_python"] = {p.name: p.read_bytes() for p in w["path"].iterdir()}
    w = write_cifar10_python(root / "pyt", n_per_batch=2, n_test=2, archive=True)
    s["cifar10_tar_gz"] = w["path"].read_bytes()
    with tarfile.open(w["path"]) as t, io.BytesIO() as plain_tar:
        with tarfile.open(fileobj=plain_tar, mode="w") as out:
            for m in t:
                out.addfile(m, t.extractfile(m) if m.isfile() else None)
        s["cifar10_tar"] = plain_tar.getvalue()
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 3), dtype=np.uint8)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"X": x, "y": np.array([[1], [10], [5]], np.uint8)})
    s["svhn_mat"] = buf.getvalue()
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"X": x, "y": np.array([[1], [10], [5]], np.uint8)}, do_compression=True)
    s["svhn_mat_compressed"] = buf.getvalue()
    s["images"] = {fmt: image_bytes(fmt, (12, 9), mode) for fmt, mode in
                   [("PNG", "RGB"), ("PNG", "P"), ("PNG", "I;16"), ("JPEG", "RGB"), ("JPEG", "CMYK"), ("GIF", "P"),
                    ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB"), ("PPM", "RGB"), ("ICO", "RGBA")]}
    z = write_image_tree(root / "tree.zip", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}, size=(32, 32),
                         as_zip=True)
    s["image_zip"] = z.read_bytes()
    state = {"format": "densenet-checkpoint-v1", "config": {"model": "densenet_bc16_k8", "lr": 0.1},
             "model": {"features.conv0.weight": torch.randn(4, 3, 3, 3), "classifier.bias": torch.zeros(10)},
             "optimizer": {"state": {0: {"momentum_buffer": torch.randn(5)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
             "epoch": 1, "step": 0, "history": [{"epoch": 1, "train_loss": 2.3}], "rng": torch.get_rng_state()[:64]}
    save_checkpoint(root / "c.pt", state)
    s["checkpoint"] = (root / "c.pt").read_bytes()
    s["checkpoint_digest"] = content_digest(state)
    torch.save(state, root / "legacy.pt")
    s["legacy_checkpoint"] = (root / "legacy.pt").read_bytes()
    from safetensors.torch import save_file
    save_file(state["model"], str(root / "w.safetensors"))
    s["safetensors"] = (root / "w.safetensors").read_bytes()
    save_arrays(root / "cache.npz", {"train_x": np.zeros((2, 3, 32, 32), np.uint8), "train_y": np.arange(2),
                                     "class_names": np.asarray(["a", "b"])})
    s["cache"] = (root / "cache.npz").read_bytes()
    s["volumes"], s["signals"] = _volume_seeds()
    vol = zipfile.ZipFile(root / "volumes.zip", "w")
    with vol:
        one_channel = {k: v for k, v in s["volumes"].items() if k not in ("four.npy", "two.nii")}
        for i, (name, content) in enumerate(sorted(one_channel.items())):
            vol.writestr(f"{'ab'[i % 2]}/{i}{name[name.index('.'):]}", content)
            vol.writestr(f"{'ba'[i % 2]}/x{i}{name[name.index('.'):]}", content)
    s["volume_zip"] = (root / "volumes.zip").read_bytes()
    s["yaml"] = yaml.safe_dump({"model": "densenet_bc100_k12", "dataset": "cifar10+", "epochs": 10, "lr": 0.1,
                                "lr_milestones": [5, 8], "batch_size": 64, "memory_efficient": True, "data": None})
    return s


def _volume_seeds() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Small valid volumes (.npy, NIfTI-1 .nii and .nii.gz, NIfTI-2, 4-D) and signals (.npy)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 6, 7)).astype(np.float32)
    volumes, signals = {}, {}
    for key, arr in (("vol.npy", a), ("int.npy", (a * 10).astype(np.int16)), ("four.npy", np.stack([a, a]))):
        buf = io.BytesIO()
        np.save(buf, arr)
        volumes[key] = buf.getvalue()
    try:
        import nibabel as nib
    except ImportError:  # the .npy seeds only
        nib = None
    if nib is not None:
        volumes["vol.nii"] = nib.Nifti1Image(a, np.eye(4)).to_bytes()
        volumes["vol.nii.gz"] = gzip.compress(nib.Nifti1Image((a * 100).astype(np.int16), np.eye(4)).to_bytes())
        volumes["two.nii"] = nib.Nifti2Image(np.stack([a, a], -1), np.eye(4)).to_bytes()
    for key, arr in (("sig.npy", rng.normal(size=(3, 40)).astype(np.float32)), ("one.npy", np.arange(30.0))):
        buf = io.BytesIO()
        np.save(buf, arr)
        signals[key] = buf.getvalue()
    return volumes, signals


# ----------------------------------------------------------------------------------- readers
def cifar_binary(seeds, examples):
    def strategy():
        kind = st.sampled_from(["cifar10", "cifar100"])
        return kind.flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(sorted(seeds[f"{k}_binary"])),
                                                st.data()))

    def check(example, tmp: Path):
        kind, name, data = example
        files = dict(seeds[f"{kind}_binary"])
        files[name] = data.draw(damaged(files[name]))
        for n, content in files.items():
            (tmp / n).write_bytes(content)
        out = read_cifar(kind, "binary", tmp)
        assert out["train_x"].shape[1:] == (3, 32, 32) and len(out["train_x"]) == len(out["train_y"])

    run_fuzz("CIFAR binary (.bin batches, label names)", strategy(), check, (DataError,), examples)


def cifar_python(seeds, examples):
    originals = seeds["cifar10_python"]
    generated = st.builds(
        lambda d, arr, labels, as_bytes: {**d, (b"data" if as_bytes else "data"): arr,
                                          (b"labels" if as_bytes else "labels"): labels},
        st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=8)), plain, max_size=3),
        arrays(), st.one_of(st.lists(st.integers(-(2**70), 2**70), max_size=5), arrays(), plain), st.booleans())
    payload = st.one_of(
        st.sampled_from(sorted(originals)).flatmap(lambda n: st.tuples(st.just(n), damaged(originals[n]))),
        st.tuples(st.sampled_from(["data_batch_1", "test_batch"]),
                  st.one_of(generated, plain, arrays()).map(lambda o: pickle.dumps(o, protocol=2))),
        st.tuples(st.just("batches.meta"), st.one_of(plain, st.builds(lambda v: {b"label_names": v}, plain))
                  .map(lambda o: pickle.dumps(o, protocol=2))),
    )

    def check(example, tmp: Path):
        name, content = example
        for n, c in {**originals, name: content}.items():
            (tmp / n).write_bytes(c)
        out = read_cifar("cifar10", "python", tmp)
        assert out["test_x"].dtype == np.uint8 and len(out["test_x"]) == len(out["test_y"])

    run_fuzz("CIFAR python (pickled batches, restricted unpickler)", payload, check, (DataError,), examples)


def cifar_archive(seeds, examples):
    payload = st.one_of(st.tuples(st.just("gz"), damaged(seeds["cifar10_tar_gz"])),  # the compressed bytes damaged
                        st.tuples(st.just("tar"), mutated(seeds["cifar10_tar"])))

    def check(example, tmp: Path):
        kind, content = example
        path = tmp / "cifar-10-python.tar.gz"
        path.write_bytes(gzip.compress(content, compresslevel=1) if kind == "tar" else content)  # damaged tar, or gz
        form, where = find_cifar("cifar10", path)
        out = read_cifar("cifar10", form, where)
        assert out["train_x"].shape[1:] == (3, 32, 32)

    run_fuzz("CIFAR archives (.tar.gz of the python release)", payload, check, (DataError,), examples)


def svhn_mat(seeds, examples):
    generated = st.tuples(arrays(), st.one_of(arrays(), plain.filter(lambda v: v is not None))).map(_savemat)
    payload = st.one_of(damaged(seeds["svhn_mat"]), mutated(seeds["svhn_mat_compressed"]), generated)

    def check(content, tmp: Path):
        (tmp / "train_32x32.mat").write_bytes(content)
        x, y = read_svhn_mat(tmp / "train_32x32.mat")
        assert x.shape[1:] == (3, 32, 32) and len(x) == len(y) and (0 <= y).all() and (y <= 9).all()

    run_fuzz("SVHN (.mat)", payload, check, (DataError,), examples)


def _savemat(xy) -> bytes:
    buf = io.BytesIO()
    try:
        scipy.io.savemat(buf, {"X": xy[0], "y": xy[1]})
    except Exception:  # noqa: BLE001 - values savemat cannot write: an empty file instead
        return b""
    return buf.getvalue()


def images(seeds, examples):
    originals = seeds["images"]
    payload = st.sampled_from(sorted(originals)).flatmap(lambda f: damaged(originals[f]))

    def check(content, tmp: Path):
        im = decode_image(content, "fuzzed image", max_pixels=MAX_PIXELS)
        assert im.mode == "RGB" and im.width * im.height <= MAX_PIXELS

    run_fuzz("images (PNG, JPEG, GIF, BMP, TIFF, WEBP, PPM, ICO)", payload, check, (DataError,), examples)


def image_folders(seeds, examples):
    names = st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=30),
                     min_size=1, max_size=6)
    members = sorted(n for n in zipfile.ZipFile(io.BytesIO(seeds["image_zip"])).namelist() if not n.endswith("/"))
    payload = st.one_of(st.tuples(st.just("zip"), damaged(seeds["image_zip"])),
                        st.tuples(st.just("folder"), st.tuples(st.sampled_from(members), st.data())),
                        st.tuples(st.just("folder"), st.tuples(st.sampled_from(members), st.data())),
                        st.tuples(st.just("names"), names),
                        st.tuples(st.just("cifar-images"), mutated(seeds["image_zip"])))

    def check(example, tmp: Path):
        kind, content = example
        path = tmp / "data.zip"
        if kind == "folder":  # a directory tree with one image damaged
            path = tmp / "tree"
            name, data = content
            with zipfile.ZipFile(io.BytesIO(seeds["image_zip"])) as z:
                z.extractall(path)
            (path / name).write_bytes(data.draw(damaged((path / name).read_bytes())))
        elif kind == "names":  # a zip of images under generated member names
            with zipfile.ZipFile(path, "w") as z:
                for i, name in enumerate(content):
                    z.writestr(name, seeds["images"]["PNG"] if i % 2 else b"not an image")
        else:
            path.write_bytes(content)
        if kind == "cifar-images":
            form, where = find_cifar("cifar10", path)
            read_cifar("cifar10", form, where, max_pixels=MAX_PIXELS)
            return
        data = build_data("folder", path, image_size=16, batch_size=4, workers=0, max_image_pixels=MAX_PIXELS)
        for loader in (data.train, data.test):
            for x, _ in loader.batches(0):
                assert x.shape[1:] == (3, 16, 16)

    run_fuzz("image folders and zips", payload, check, (DataError,), examples)


def volumes(seeds, examples):
    originals = {**seeds["volumes"], **{f"signal {k}": v for k, v in seeds["signals"].items()}}
    payload = st.sampled_from(sorted(originals)).flatmap(lambda f: st.tuples(st.just(f), damaged(originals[f])))

    def check(example, tmp: Path):
        name, content = example
        reader = read_signal if name.startswith("signal") else read_volume
        a = reader(content, f"fuzzed {name}", max_values=MAX_PIXELS)
        assert a.dtype == np.float32 and a.ndim == (2 if reader is read_signal else 4) and np.isfinite(a).all()
        assert a.size <= MAX_PIXELS

    run_fuzz("volumes and signals (.npy, .nii, .nii.gz, NIfTI-2)", payload, check, (DataError,), examples)


def volume_folders(seeds, examples):
    payload = st.one_of(st.tuples(st.just("zip"), damaged(seeds["volume_zip"])),
                        st.tuples(st.just("member"), st.tuples(st.sampled_from([".npy", ".nii", ".nii.gz"]), st.data())))

    def check(example, tmp: Path):
        kind, content = example
        path = tmp / "volumes.zip"
        if kind == "zip":
            path.write_bytes(content)
        else:  # a folder tree with one file damaged
            path = tmp / "tree"
            with zipfile.ZipFile(io.BytesIO(seeds["volume_zip"])) as z:
                z.extractall(path)
            suffix, data = content
            target = next(p for p in sorted(path.rglob("*")) if p.is_file() and p.name.endswith(suffix))
            target.write_bytes(data.draw(damaged(target.read_bytes())))
        data = build_data("volumes", path, image_size=8, batch_size=2, workers=0, max_image_pixels=MAX_PIXELS,
                          val_fraction=0.3)
        for loader in (data.train, data.test):
            for x, _ in loader.batches(0):
                assert x.shape[2:] == (8, 8, 8) and torch.isfinite(x).all()

    run_fuzz("volume folders and zips", payload, check, (DataError,), examples)


def checkpoints(seeds, examples):
    payload = st.one_of(st.tuples(st.just("digest"), damaged(seeds["checkpoint"])),
                        st.tuples(st.just("legacy"), mutated(seeds["legacy_checkpoint"])))

    def check(example, tmp: Path):
        kind, content = example
        (tmp / "c.pt").write_bytes(content)
        state = load_checkpoint(tmp / "c.pt")
        if kind == "digest":  # what loads is exactly what was written
            assert content_digest(state) == seeds["checkpoint_digest"]
        assert isinstance(state, dict)

    run_fuzz("checkpoints (load_checkpoint)", payload, check, (CheckpointError,), examples)


def weights(seeds, examples):
    payload = st.one_of(st.tuples(st.just("w.pt"), damaged(seeds["checkpoint"])),
                        st.tuples(st.just("w.safetensors"), damaged(seeds["safetensors"])))

    def check(example, tmp: Path):
        name, content = example
        (tmp / name).write_bytes(content)
        state = read_state_dict(tmp / name)
        assert all(isinstance(v, torch.Tensor) for v in state.values())

    run_fuzz("weight files (.pt, .safetensors)", payload, check, (WeightsError,), examples)


def data_cache(seeds, examples):
    def check(content, tmp: Path):
        (tmp / "c.npz").write_bytes(content)
        arrays = load_arrays(tmp / "c.npz")
        assert isinstance(arrays, dict)

    run_fuzz("decoded-data cache (.npz)", damaged(seeds["cache"]), check, (DataError,), examples)


# 10^9 strings through aliases in a few hundred bytes: a message quoting the value in full would never end
BILLION_LAUGHS = "lr_milestones:\n- &a [" + ", ".join(["lol"] * 10) + "]\n" + "".join(
    f"- &{x} [" + ", ".join([f"*{p}"] * 10) + "]\n" for p, x in zip("abcdefgh", "bcdefghi"))


NASTY_YAML = [  # (text, what the ConfigError says; None: a valid configuration)
    (BILLION_LAUGHS, "wrong type for lr_milestones"), ("[" * 5000 + "]" * 5000, "nests lists or mappings too deeply"),
    ("{a: " * 3000 + "1" + "}" * 3000, "nests lists or mappings too deeply"), ("lr: .inf\n", "must be finite"),
    ("lr: .nan\n", "lr must be positive"), ("lr_gamma: -.inf\n", "must be finite"), ("epochs: 1e400\n", "wrong type"),
    ("? [a, b]\n: 1\n", "not valid YAML"), ("1: 2\nb: 3\n", "unknown key(s) 1, b"), ("~: 1\n", "unknown key(s) None"),
    ("!!python/object/apply:os.system ['true']\n", "not valid YAML"), ("\ufeffepochs: 3\n", None),
    ("model: !!binary aGVsbG8=\n", "wrong type for model"),
]


def yaml_configs(seeds, examples):
    fields = [f for f in TrainConfig.__dataclass_fields__]
    mapping = st.dictionaries(st.one_of(st.sampled_from(fields), st.text(max_size=10), st.integers(), st.booleans(), st.none()),
                              plain, max_size=6).map(lambda d: yaml.safe_dump(d, allow_unicode=True))
    payload = st.one_of(
        st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
        st.builds(lambda b: b.decode("utf-8", "replace"), mutated(seeds["yaml"].encode())), mapping,
        st.sampled_from([text for text, _ in NASTY_YAML]),
    )

    def check(text, tmp: Path):
        path = tmp / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        config = resolve_config({}, path)
        assert isinstance(config, TrainConfig)

    run_fuzz("YAML configs (resolve_config)", payload, check, (ConfigError,), examples)


@pytest.mark.parametrize("text, message", NASTY_YAML, ids=range(len(NASTY_YAML)))
def test_nasty_yaml_configs(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    if message is None:
        assert resolve_config({}, tmp_path / "c.yaml").epochs == 3
        return
    with pytest.raises(ConfigError) as refused:
        resolve_config({}, tmp_path / "c.yaml")
    assert message in str(refused.value) and len(str(refused.value)) < 2000


@pytest.mark.parametrize("compressed", [False, True])
def test_mat_reader_agrees_with_scipy(tmp_path, compressed):
    """The own .mat reader gives what scipy.io.loadmat gives on valid files (several label types),
    skipping variables that are not numeric matrices."""
    x = np.random.default_rng(1).integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    for y in (np.array([[1], [10], [5], [3], [2]], np.uint8), np.array([[1.0], [10], [5], [3], [2]]), np.arange(1, 6)[:, None]):
        scipy.io.savemat(tmp_path / "a.mat", {"note": "text", "cell": np.array([1, "a"], dtype=object), "X": x, "y": y},
                         do_compression=compressed)
        ours, theirs = read_mat_arrays(tmp_path / "a.mat", ("X", "y")), scipy.io.loadmat(tmp_path / "a.mat")
        for k in ("X", "y"):
            assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape
            np.testing.assert_array_equal(ours[k], theirs[k])


def test_mat_file_that_crashed_scipy(tmp_path):
    """Found by the fuzzer: one altered type code (miUINT8 -> 127) made scipy.io.loadmat segfault."""
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1), np.uint8)})
    raw = bytearray((tmp_path / "train_32x32.mat").read_bytes())
    at = raw.find(b"\x01\x00\x01\x00X\x00\x00\x00") + 8  # the name 'X' (a small element), then X's data tag
    assert raw[at] == 2
    raw[at] = 127
    (tmp_path / "train_32x32.mat").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="not a readable MATLAB file.*data type code 127"):
        read_svhn_mat(tmp_path / "train_32x32.mat")


READERS = {f.__name__: f for f in (cifar_binary, cifar_python, cifar_archive, svhn_mat, images, image_folders,
                                   checkpoints, weights, data_cache, yaml_configs, volumes, volume_folders)}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("reader", READERS)
def test_fuzz_reader(seeds, reader):
    READERS[reader](seeds, EXAMPLES)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("reader", READERS)
def test_fuzz_reader_more(seeds, reader):
    READERS[reader](seeds, EXAMPLES * SLOW_FACTOR)


def test_hang_guard_fires(seeds):
    """The guard that turns a hang into a failure works (a reader stuck in a loop)."""
    global TIME_LIMIT
    limit, TIME_LIMIT = TIME_LIMIT, 1
    try:
        with pytest.raises(Hang):
            run_fuzz("a reader that hangs", st.just(b""), lambda example, tmp: _spin(), (DataError,), 1)
    finally:
        TIME_LIMIT = limit


def _spin() -> None:
    while True:
        pass
