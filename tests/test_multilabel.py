"""Multi-label training, evaluation and prediction from a label file (issue 25), on real PNG files and
CSVs written here: the loaders' targets, the masked loss, pos-weight, the plateau schedule, the run
folder (metrics.csv, report.json, roc.png, thresholds in the checkpoint), `densenet eval` and
`densenet predict` agreeing with scikit-learn, full-depth greyscale images, one-channel models."""
import contextlib
import csv
import io
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import SHARED_ZIP
from PIL import Image
from sklearn import metrics as skm

from densenet.cli import main
from densenet.data import DataError, ImageOptions, build_data, fit_image, match_channels, read_image
from densenet.data.transforms import eval_image
from densenet.io.checkpoint import load_checkpoint
from densenet.training import resolve_config
from densenet.training.config import ConfigError
from densenet.training.objective import Objective, masked_bce, positive_weights
from densenet.training.schedule import lr_at, plateau_drops

LABELS = ["red", "blue", "green"]
MODEL = ["--model", "densenet_bc16_k8", "--threads", "1", "--workers", "0", "--quiet", "--seed", "3"]


def run_main(*argv: str) -> tuple[int, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = main(list(argv))
    return code, buffer.getvalue()


def write_label_task(root: Path, n: dict[str, int], seed: int = 0, uncertain_every: int = 0) -> Path:
    """root/images/*.png (32x32 RGB): the left half red or not, the right half blue or not, a green
    square or not, on noise; root/labels.csv in CheXpert's layout with a Split column."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for split, count in n.items():
        for i in range(count):
            y = rng.integers(0, 2, 3)
            a = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
            if y[0]:
                a[:, :16, 0] = 230
            if y[1]:
                a[:, 16:, 2] = 230
            if y[2]:
                a[12:20, 12:20, 1] = 250
            name = f"images/{split}{i:03d}.png"
            Image.fromarray(a).save(root / name)
            cells = [str(float(v)) for v in y]
            if uncertain_every and i % uncertain_every == 0:
                cells[2] = "-1.0"
            rows.append([name, split, *cells])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Path", "Split", *LABELS])
        w.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return write_label_task(tmp_path_factory.mktemp("labels"), {"train": 48, "val": 16, "test": 16}, uncertain_every=4)


@pytest.fixture(scope="module")
def run(task, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runs") / "labels"
    code, printed = run_main("train", "--dataset", "csv", "--data", str(task), *MODEL, "--epochs", "2", "--batch-size", "8",
                             "--image-size", "32", "--uncertain", "ignore", "--pos-weight", "auto", "--out", str(out))
    assert code == 0, printed
    return out, printed


# ------------------------------------------------------------------------------------- the data
def test_label_file_loaders_give_float_targets_with_nan_for_ignored(task):
    data = build_data("csv", task, batch_size=8, workers=0, image_size=32, uncertain="ignore")
    assert data.multilabel and data.class_names == LABELS and data.num_classes == 3
    assert (data.train.num_images, data.val.num_images, data.test.num_images) == (48, 16, 16)
    x, y = next(iter(data.test.batches(0)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (8, 3) and y.dtype == torch.float32
    assert torch.isnan(y[0, 2]) and not torch.isnan(y[:, :2]).any()  # row 0 of each split: green uncertain
    ones = build_data("csv", task, batch_size=8, workers=0, image_size=32, uncertain="ones")
    assert next(iter(ones.test.batches(0)))[1][0, 2] == 1.0
    with pytest.raises(DataError, match="balanced"):
        build_data("csv", task, workers=0, balanced=True)


def test_a_label_file_without_a_split_is_split_by_patient(tmp_path):
    root = tmp_path / "d"
    csv_path = write_label_task(root, {"all": 40})
    rows = list(csv.reader(open(csv_path)))
    with open(csv_path, "w", newline="") as f:  # no Split column; 20 patients of 2 images
        w = csv.writer(f)
        w.writerow(["Path", "Patient ID", *LABELS])
        w.writerows([r[0], f"p{i // 2}", *r[2:]] for i, r in enumerate(rows[1:]))
    data = build_data("csv", csv_path, workers=0, image_size=32, seed=1)
    patients = {s: {int(Path(data.train.tree.files[i]).stem[3:]) // 2 for i in getattr(data, s).indices}
                for s in ("train", "val", "test")}
    assert not patients["train"] & patients["test"] and not patients["train"] & patients["val"]
    assert data.train.num_images + data.val.num_images + data.test.num_images == 40


# ------------------------------------------------------------------------------------- the loss
def test_masked_bce_leaves_ignored_labels_out_of_the_loss_and_its_mean():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    known = torch.nn.functional.binary_cross_entropy_with_logits(logits[[0, 1, 1], [0, 0, 1]], targets[[0, 1, 1], [0, 0, 1]])
    assert torch.isclose(masked_bce(logits, targets), known)
    assert masked_bce(logits, torch.full((2, 2), float("nan"))) == 0  # nothing known: no loss, no NaN
    per_image = masked_bce(logits, targets, reduction="image")  # the training loss: summed per image, the scale of
    assert torch.isclose(per_image, known * 3 / 2)  # softmax cross-entropy (3 known labels over 2 images)
    assert torch.isclose(Objective(multilabel=True).loss(logits, targets), per_image)
    weight = torch.tensor([3.0, 1.0])
    assert masked_bce(logits[:1, :1], targets[:1, :1], weight[:1]) == pytest.approx(
        3 * float(torch.nn.functional.softplus(-logits[0, 0])))


def test_pos_weight_auto_is_negatives_over_positives():
    t = np.array([[1, 0, np.nan], [0, 0, 1], [0, 0, 1], [0, 0, 0]], np.float32)
    assert positive_weights(t).tolist() == [3.0, 1.0, 0.5]  # a label without positives: 1


def test_multilabel_correct_counts_each_images_share_of_labels_right():
    obj = Objective(multilabel=True)
    logits = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, float("nan"), 1.0]])
    assert obj.correct(logits, targets).item() == pytest.approx(2 / 3 + 1 / 2)


def test_plateau_schedule_divides_after_epochs_without_a_lower_validation_loss():
    assert plateau_drops([1.0, 0.9, 0.95, 0.8, 0.85, 0.86], 1) == 3
    assert plateau_drops([1.0, 0.9, 0.95, 0.8, 0.85, 0.86], 2) == 1
    config = resolve_config({"dataset": "csv", "data": "x.csv", "recipe": "chexnet", "epochs": 5})
    assert (config.optimizer, config.schedule, config.batch_size, config.lr, config.model) == (
        "adam", "plateau", 16, 1e-3, "densenet121")
    assert lr_at(config, 3 * 10, 10, [1.0, 0.9, 0.95]) == pytest.approx(1e-4)
    assert lr_at(config, 2 * 10, 10, [1.0, 0.9, 0.95]) == pytest.approx(1e-3)  # epoch 2 sees epochs 0-1 only


def test_label_file_keys_are_refused_elsewhere():
    with pytest.raises(ConfigError, match="pos_weight"):
        resolve_config({"dataset": "cifar10+", "pos_weight": "auto"})
    with pytest.raises(ConfigError, match="in_channels"):
        resolve_config({"dataset": "folder", "data": "x", "in_channels": 1})
    with pytest.raises(ConfigError, match="uncertain"):
        resolve_config({"dataset": "csv", "data": "x.csv", "uncertain": "maybe"})


# ------------------------------------------------------------------------------------- a run
def test_run_writes_label_metrics_roc_and_thresholds(run):
    out, printed = run
    assert "test mean AUROC" in printed and "mean AUROC" in printed.splitlines()[-1]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 2 and {"val_loss", "test_mean_auroc", "test_mean_ap", "test_auroc[red]"} <= set(rows[0])
    report = json.loads((out / "report.json").read_text())
    assert report["multilabel"] and report["label_names"] == LABELS
    per = report["test_per_label"]
    assert set(per) == set(LABELS) and per["green"]["images"] == 12  # 4 of the 16 test images uncertain: ignored
    assert report["test_mean_auroc"] == pytest.approx(np.mean([per[n]["auroc"] for n in LABELS]))
    assert report["threshold_note"] == "chosen on the validation split"
    assert (out / "roc.png").is_file() and not (out / "confusion.csv").exists()
    data = load_checkpoint(out / "checkpoint.pt")["data"]
    assert data["multilabel"] and len(data["thresholds"]) == 3
    assert list(report["thresholds"].values()) == data["thresholds"]


def test_eval_and_predict_agree_with_scikit_learn(run, task, tmp_path):
    out, _ = run
    report = json.loads((out / "report.json").read_text())
    code, printed = run_main("eval", str(out / "checkpoint.pt"), "--data", str(task), "--workers", "0", "--out",
                             str(tmp_path / "eval"))
    assert code == 0, printed
    assert "mean" in printed and "AUROC" in printed
    summary = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert summary["mean_auroc"] == pytest.approx(report["test_mean_auroc"], abs=1e-6)
    assert (tmp_path / "eval" / "roc.png").is_file()
    rows = list(csv.DictReader(open(task)))
    tests = [task.parent / r["Path"] for r in rows if r["Split"] == "test"]
    code, printed = run_main("predict", str(out / "checkpoint.pt"), *map(str, tests), "--csv", str(tmp_path / "p.csv"))
    assert code == 0, printed
    predicted = {Path(r["image"]).name: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    truth = {Path(r["Path"]).name: r for r in rows if r["Split"] == "test"}
    aurocs = []
    for label in LABELS:
        pairs = [(float(truth[k][label]), float(p[label])) for k, p in predicted.items() if truth[k][label] != "-1.0"]
        y, s = zip(*pairs)
        aurocs.append(skm.roc_auc_score(y, s))
    assert np.mean(aurocs) == pytest.approx(report["test_mean_auroc"], abs=1e-6)
    thresholds = load_checkpoint(out / "checkpoint.pt")["data"]["thresholds"]
    first = next(iter(predicted.values()))
    above = [n for n, t in zip(LABELS, thresholds) if float(first[n]) >= t]
    assert first["positive_labels"] == "|".join(above)


def test_explain_maps_one_finding(run, task, tmp_path):
    out, _ = run
    image = task.parent / "images" / "test000.png"
    code, printed = run_main("explain", str(out / "checkpoint.pt"), str(image), "--out", str(tmp_path / "maps"),
                             "--class", "blue")
    assert code == 0, printed
    assert "map for blue" in printed and (tmp_path / "maps" / "test000.png").is_file()
    assert np.load(tmp_path / "maps" / "test000.npy").shape == (32, 32)


def test_resume_of_a_chexnet_recipe_run_is_bit_identical(task, tmp_path, monkeypatch):
    """Adam, the plateau schedule (fed by the validation losses in the checkpoint's history), pos-weight
    and the masked loss: stopped in epoch 2 and resumed, the weights equal an uninterrupted run's."""
    from densenet.training.distributed import Dist

    args = ["train", "--dataset", "csv", "--data", str(task), *MODEL, "--recipe", "chexnet", "--model", "densenet_bc16_k8",
            "--epochs", "3", "--batch-size", "8", "--image-size", "32", "--uncertain", "ignore", "--checkpoint-every", "0",
            "--lr", "0.01"]
    reference = tmp_path / "reference"
    assert run_main(*args, "--out", str(reference))[0] == 0
    real, calls = Dist.sum, []

    def signal_at_step_8(self, values, device):
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, values, device)

    monkeypatch.setattr(Dist, "sum", signal_at_step_8)
    out = tmp_path / "stopped"
    assert run_main(*args, "--out", str(out))[0] == 128 + signal.SIGTERM
    monkeypatch.setattr(Dist, "sum", real)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    code, printed = run_main("train", "--resume", str(out), "--quiet")
    assert code == 0, printed
    a, b = load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data"]["thresholds"] == b["data"]["thresholds"]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and all(r["val_loss"] for r in rows)


# ------------------------------------------------------------------------------------- images
def png16(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint16)).save(path)  # mode I;16
    return path


def test_16_bit_images_keep_their_low_bits(tmp_path):
    base = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 8 + 20000
    a = png16(tmp_path / "a.png", base)
    b = png16(tmp_path / "b.png", base + 1)  # differs only in the low 8 bits
    options = ImageOptions(channels=1)
    x, y = (match_channels(eval_image(fit_image(read_image(p.read_bytes(), p.name, options), options), 32), 1)
            for p in (a, b))
    assert x.shape == (1, 32, 32) and x.dtype == np.float32
    assert not np.array_equal(x, y)
    assert np.allclose(y - x, 1 / 257, atol=1e-3)  # one 16-bit step on the 0-255 scale
    assert read_image(a.read_bytes(), "a.png", options).mode == "F"
    tiff = tmp_path / "a.tif"
    Image.fromarray(base).save(tiff)  # 16-bit TIFF, as scanners write them
    t = np.asarray(read_image(tiff.read_bytes(), "a.tif", options))
    assert t.dtype == np.float32 and np.allclose(t, base / 257, atol=1e-3)


def test_channels_and_fit(tmp_path):
    wide = Image.fromarray(np.full((20, 40, 3), 200, np.uint8))
    options = ImageOptions(channels=1, fit="pad")
    padded = fit_image(wide, options)
    assert padded.size == (40, 40) and np.asarray(padded)[0, 0].tolist() == [0, 0, 0]  # black bands above and below
    grey = match_channels(np.full((1, 4, 4), 10, np.uint8), 3)
    assert grey.shape == (3, 4, 4) and (grey == 10).all()
    luma = match_channels(np.stack([np.full((4, 4), v, np.uint8) for v in (100, 50, 10)]), 1)
    assert luma.shape == (1, 4, 4) and luma[0, 0, 0] == pytest.approx(0.299 * 100 + 0.587 * 50 + 0.114 * 10, rel=1e-5)
    with pytest.raises(DataError, match="in_channels"):
        ImageOptions(channels=2)
    with pytest.raises(DataError, match="fit"):
        ImageOptions(fit="stretch")


def test_one_channel_model_trains_on_greyscale_16_bit_files(tmp_path):
    """A greyscale model (--in-channels 1, padded to square, in the memory-efficient mode) on 16-bit PNGs."""
    root = tmp_path / "grey"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["Path,Split,bright,top"]
    for i, split in enumerate(["train"] * 16 + ["test"] * 8):
        y = rng.integers(0, 2, 2)
        a = rng.integers(0, 4000, (24, 36)) + 40000 * y[0]
        if y[1]:
            a[:8] += 20000
        png16(root / "img" / f"{i}.png", a)
        lines.append(f"img/{i}.png,{split},{y[0]},{y[1]}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    code, printed = run_main("train", "--dataset", "csv", "--data", str(root / "labels.csv"), *MODEL, "--epochs", "1",
                             "--batch-size", "8", "--image-size", "32", "--in-channels", "1", "--fit", "pad",
                             "--memory-efficient", "--out", str(out))
    assert code == 0, printed
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["model"]["features.conv0.weight"].shape[1] == 1
    assert checkpoint["data"]["in_channels"] == 1 and checkpoint["data"]["fit"] == "pad"
    assert json.loads((out / "report.json").read_text())["threshold_note"].startswith("0.5")  # no val split
    code, printed = run_main("predict", str(out / "checkpoint.pt"), str(root / "img" / "20.png"))
    assert code == 0 and "bright" in printed and "top" in printed
    assert math.isfinite(json.loads((out / "report.json").read_text())["test_per_label"]["bright"]["f1"] or 0.0)


def test_a_label_file_of_dicom_images_loads_inverted_and_at_full_depth(tmp_path):
    from test_dicom import dicom_bytes

    root = tmp_path / "dcm"
    root.mkdir()
    lines = ["Image Index,Finding Labels,Patient ID"]
    for i in range(20):
        pixels = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 50 + 7 * i)
        kind = "MONOCHROME1" if i == 0 else "MONOCHROME2"
        (root / f"{i}.dcm").write_bytes(dicom_bytes(tmp_path, pixels, kind))
        lines.append(f"{i}.dcm,{'Effusion' if i % 2 else 'No Finding'},{i}")
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    options = ImageOptions(channels=1, fit="pad")
    data = build_data("csv", root / "Data_Entry_2017.csv", batch_size=4, workers=0, image_size=16, image_options=options)
    assert data.class_names == ["Effusion"] and data.in_channels == 1 and data.model_args() == {"in_channels": 1}
    first = read_image((root / "0.dcm").read_bytes(), "0.dcm", options)
    second = read_image((root / "1.dcm").read_bytes(), "1.dcm", options)
    assert first.mode == "F" and np.asarray(first)[0, 0] == 255 and np.asarray(second)[0, 0] == 0  # MONOCHROME1 inverted
    x, y = next(iter(data.train.batches(0)))
    assert x.shape[1:] == (1, 16, 16) and y.shape[1] == 1


def test_missing_images_are_named_and_skip_bad_goes_on(task, tmp_path):
    root = tmp_path / "gaps"
    csv_path = write_label_task(root, {"train": 24, "val": 8, "test": 8})
    for name in ("train003.png", "train005.png", "test001.png"):
        (root / "images" / name).unlink()
    args = ["train", "--dataset", "csv", "--data", str(csv_path), *MODEL, "--epochs", "1", "--batch-size", "8",
            "--image-size", "32", "--out", str(tmp_path / "run")]
    code, printed = run_main(*args)
    assert code != 0 and "3 of 40 rows" in printed and "train003.png" in printed and "--skip-bad" in printed
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "report.json").exists()
    code, printed = run_main(*args, "--skip-bad")
    assert code == 0, printed
    assert "3 row(s)" in printed and "left out" in printed
    assert json.loads((tmp_path / "run" / "report.json").read_text())["test_per_label"]["red"]["images"] == 7


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_ZIP.is_file(), reason=f"shared CIFAR-10 JPEG zip not found at {SHARED_ZIP}")
def test_the_worked_example_of_docs_multilabel_at_a_small_size(tmp_path):
    """docs/multilabel.md's commands, small: mosaics from the real CIFAR-10 copy, a short run, eval and
    predict; the AUROC the run reports equals scikit-learn's on predict's CSV to 1e-6, and it learns
    (above chance on held-out mosaics)."""
    from densenet.data.mosaic import main as make_mosaics

    assert make_mosaics([str(SHARED_ZIP), str(tmp_path / "mosaic"), "--train", "640", "--val", "128", "--test", "256"]) == 0
    labels = tmp_path / "mosaic" / "labels.csv"
    out = tmp_path / "run"
    code, printed = run_main("train", "--dataset", "csv", "--data", str(labels), "--model", "densenet_bc16_k8",
                             "--image-size", "32", "--recipe", "budget", "--epochs", "3", "--workers", "0", "--quiet",
                             "--out", str(out))
    assert code == 0, printed
    report = json.loads((out / "report.json").read_text())
    assert report["test_mean_auroc"] > 0.55 and len(report["test_per_label"]) == 10
    rows = [r for r in csv.DictReader(open(labels)) if r["Split"] == "test"]
    code, printed = run_main("predict", str(out / "checkpoint.pt"), str(tmp_path / "mosaic" / "images" / "test"),
                             "--csv", str(tmp_path / "test.csv"))
    assert code == 0, printed
    predicted = {Path(r["image"]).name: r for r in csv.DictReader(open(tmp_path / "test.csv"))}
    names = list(report["test_per_label"])
    y = np.array([[float(r[n]) for n in names] for r in rows])
    s = np.array([[float(predicted[Path(r["Path"]).name][n]) for n in names] for r in rows])
    assert skm.roc_auc_score(y, s, average="macro") == pytest.approx(report["test_mean_auroc"], abs=1e-6)


@pytest.mark.slow
def test_two_processes_score_every_test_image_once(task, tmp_path):
    """torchrun, 2 processes (gloo): each rank scores its shard of the test split, the probabilities are
    gathered, so report.json's AUROC covers every test image once, as in one process."""
    from test_distributed import ok, single, torchrun

    args = ["train", "--dataset", "csv", "--data", str(task), "--model", "densenet_bc16_k8", "--image-size", "32",
            "--batch-size", "16", "--epochs", "1", "--uncertain", "ignore", "--amp", "off", "--sync-bn", "--deterministic",
            "--quiet", "--threads", "1", "--workers", "0", "--checkpoint-every", "0"]
    two = ok(torchrun([*args, "--out", str(tmp_path / "two")]))
    ok(single([*args, "--out", str(tmp_path / "one")]))
    assert "2 processes x 8, gloo" in two.stdout
    a, b = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("one", "two"))
    assert b["processes"] == 2
    assert [r["images"] for r in b["test_per_label"].values()] == [r["images"] for r in a["test_per_label"].values()] \
        == [16, 16, 12]
    assert b["test_mean_auroc"] == pytest.approx(a["test_mean_auroc"], abs=0.05)
