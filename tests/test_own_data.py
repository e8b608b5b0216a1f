"""Your own images (issue #19): the model's input size by default, metrics that fit the number of
classes (per-class precision/recall/F1, balanced accuracy, a confusion matrix from train, eval and
predict), stratified and seeded held-out splits, class-balanced sampling, and bad trees named."""
import contextlib
import csv
import io
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from data_helpers import image_bytes, write_image_tree
from sklearn import metrics as skm

from densenet.analysis import class_metrics, confusion_matrix, plot_confusion, read_confusion_csv, top5_applies
from densenet.cli import main
from densenet.data import ArrayLoader, DataError, build_data
from densenet.io.checkpoint import load_checkpoint
from densenet.serving import load_predictor
from densenet.training import EvalCounts, resolve_config

MODEL = ["--model", "densenet_bc16_k8", "--threads", "1", "--workers", "0", "--quiet", "--seed", "3"]
TINY = ["--model", "densenet_bc16_k8", "--dataset", "cifar10+", "--batch-size", "32", "--train-subset", "256",
        "--test-subset", "100", "--eval-batch-size", "100", "--threads", "1", "--quiet", "--seed", "3"]
MIXED_MODES = [("L", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("P", "GIF"), ("CMYK", "JPEG")]


def run_main(*argv: str) -> tuple[int, str]:
    """``densenet ARGV`` in this process: (exit code, what it printed on stdout and stderr)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = main(list(argv))
    return code, buffer.getvalue()


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Path:
    """own/<class>/: 200x150 photos, 66 cats, 17 dogs (5 of them greyscale, RGBA, 16-bit, palette and
    CMYK), 6 owls, and a note that is not an image."""
    root = write_image_tree(tmp_path_factory.mktemp("data") / "own", {"": {"cats": 66, "dogs": 12, "owls": 6}},
                            size=(200, 150))
    for i, (mode, fmt) in enumerate(MIXED_MODES):
        (root / "dogs" / f"mode{i}.{fmt.lower()}").write_bytes(image_bytes(fmt, (200, 150), mode, seed=100 + i))
    (root / "cats" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def run(own, tmp_path_factory) -> tuple[Path, str]:
    """A 1-epoch run on ``own`` with no --image-size: (run folder, what it printed)."""
    out = tmp_path_factory.mktemp("runs") / "own"
    code, printed = run_main("train", "--dataset", "folder", "--data", str(own), *MODEL, "--epochs", "1",
                             "--batch-size", "16", "--out", str(out))
    assert code == 0, printed
    return out, printed


# ----------------------------------------------------------------------------------- 1. the input size
def test_folder_input_size_follows_the_model():
    def size(**kw) -> int | None:
        return resolve_config({"data": "own", **kw}).image_size

    assert size(dataset="folder", model="densenet_bc40_k12") == 32
    assert size(dataset="folder", model="densenet121") == 224
    assert size(dataset="imagenet", model="densenet169") == 224
    assert size(dataset="folder", model="densenet121", image_size=96) == 96
    assert size(dataset="cifar10", model="densenet_bc40_k12") is None  # 32x32 arrays: no resizing
    assert size(dataset="folder", model="densenet121", image_size=[96]) == 96  # --image-size 96
    with pytest.raises(ValueError, match=r"three sides \(32 32 32\) are for --dataset volumes; .*--image-size N"):
        size(dataset="folder", image_size=[32, 32, 32])


def test_run_on_own_images_trains_at_the_model_size_and_says_what_it_saw(run, own):
    out, printed = run
    assert yaml.safe_load((out / "config.yaml").read_text())["image_size"] == 32
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["data"]["image_size"] == 32 and state["data"]["class_names"] == ["cats", "dogs", "owls"]
    assert load_predictor(out / "checkpoint.pt")[1]["image_size"] == 32  # predict reuses it
    assert ("note: the images are about 200x150 pixels (median of a sample) and are resized to 32x32 (downscaled "
            "4.7x), the input size of densenet_bc16_k8; --image-size N changes the size") in printed
    assert "note: 1 file(s) left out, not images by their suffix (e.g. cats/notes.txt)" in printed
    assert ("note: the classes are out of balance (12:1: cats has 59 training images, owls 5); the balanced accuracy "
            "and macro F1 in report.json weigh every class alike, and --balanced-sampler draws classes evenly") in printed
    assert printed.count("note: the images are about") == 1


def test_small_images_on_an_imagenet_model_are_pointed_out(tmp_path, monkeypatch):
    """The issue's case: 32x32 photos with densenet121 at its 224 would be upscaled 7x; the note names the flag."""
    from densenet.training import loop

    root = write_image_tree(tmp_path / "own", {"": {"a": 4, "b": 4}}, size=(32, 32))
    config = resolve_config({"dataset": "folder", "data": str(root), "model": "densenet121"})
    data = build_data("folder", root, image_size=config.image_size, workers=0)
    notes = loop.data_notes(config, data)
    assert any("about 32x32 pixels (median of a sample) and are resized to 224x224 (upscaled 7.0x), the input size of "
               "densenet121; --image-size 32 trains at their size" in n for n in notes), notes


# ----------------------------------------------------------------------------------- 2. metrics that fit the task
def test_report_and_metrics_fit_three_classes(run):
    out, printed = run
    report = json.loads((out / "report.json").read_text())
    assert report["test_top5_error"] is None and report["class_names"] == ["cats", "dogs", "owls"]
    assert report["train_class_counts"] == {"cats": 59, "dogs": 15, "owls": 5} and report["class_imbalance"] == 11.8
    per_class = report["test_per_class"]
    assert {k: v["support"] for k, v in per_class.items()} == {"cats": 7, "dogs": 2, "owls": 1}  # 10% of each class
    confusion, names = read_confusion_csv(out / "confusion.csv")
    assert names == ["cats", "dogs", "owls"] and confusion.sum(1).tolist() == [7, 2, 1]
    assert report["test_error"] == pytest.approx(100 * (1 - np.trace(confusion) / confusion.sum()))
    # the same numbers as scikit-learn on the image-by-image labels
    truth = np.repeat(np.arange(3), confusion.sum(1))
    predicted = np.concatenate([np.repeat(np.arange(3), row) for row in confusion])
    assert report["test_balanced_accuracy"] == pytest.approx(100 * skm.balanced_accuracy_score(truth, predicted), abs=1e-3)
    assert report["test_macro_f1"] == pytest.approx(
        100 * skm.f1_score(truth, predicted, average="macro", zero_division=0.0), abs=1e-3)
    assert per_class["cats"]["recall"] == pytest.approx(100 * confusion[0, 0] / 7, abs=1e-3)
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    old = ["epoch", "train_loss", "train_error", "val_error", "test_error", "test_top5_error", "lr", "seconds", "images_per_s",
           "eval_seconds"]
    assert list(rows[0])[:10] == old and rows[0]["test_top5_error"] == ""
    assert float(rows[0]["test_macro_f1"]) == report["test_macro_f1"]
    assert float(rows[0]["test_f1[owls]"]) == per_class["owls"]["f1"]
    assert {"test_balanced_accuracy", "test_precision[dogs]", "test_recall[cats]"} <= set(rows[0])
    assert "top-5" not in printed and "balanced accuracy" in printed
    assert main(["table", str(out)]) == 0 and main(["plot", str(out), "--out", str(out / "plot.png")]) == 0


def test_eval_reuses_the_size_and_the_held_out_split(run, own, capsys):
    out, _ = run
    report = json.loads((out / "report.json").read_text())
    assert main(["eval", str(out / "checkpoint.pt"), "--data", str(own), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"folder test set, 10 images: top-1 error {report['test_error']:.2f}%\n" in printed  # no top-5 with 3 classes
    assert "true \\ predicted" in printed and "macro average" in printed
    written = out / "eval-folder"
    assert (read_confusion_csv(written / "confusion.csv")[0] == read_confusion_csv(out / "confusion.csv")[0]).all()
    assert (written / "confusion.png").is_file()
    summary = json.loads((written / "eval.json").read_text())
    assert summary["top5_error"] is None and summary["macro_f1"] == report["test_macro_f1"]


def test_eval_on_a_tree_of_other_classes_is_refused(run, tmp_path, capsys):
    out, _ = run
    other = write_image_tree(tmp_path / "other", {"": {"ants": 3, "bees": 3, "cows": 3}})
    assert main(["eval", str(out / "checkpoint.pt"), "--data", str(other), "--workers", "0"]) == 2
    assert "(ants, bees, cows) are not the classes the model was trained on (cats, dogs, owls)" in capsys.readouterr().err


def test_confusion_matrix_picture_of_many_classes(tmp_path):
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 5, (70, 70))
    confusion[3] = 0  # a class without test images: a blank row
    plot_confusion(tmp_path / "c.png", confusion, [f"class{i}" for i in range(70)])
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert not top5_applies(5) and top5_applies(6)


def test_counts_summed_over_processes_keep_the_confusion_matrix():
    a = EvalCounts(3, 2, 3, 1.5, torch.tensor([[1, 0], [1, 1]]))
    b = EvalCounts(2, 1, 2, 0.5, torch.tensor([[0, 1], [0, 1]]))
    summed = EvalCounts.from_list([x + y for x, y in zip(a.as_list(), b.as_list())])
    assert summed.images == 5 and summed.top1 == 3 and torch.equal(summed.confusion, torch.tensor([[1, 1], [1, 2]]))
    assert EvalCounts.from_list(EvalCounts(1, 1, 1, 0.1).as_list()).confusion is None


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_class_metrics_match_scikit_learn_on_labels():
    rng = np.random.default_rng(1)
    truth, predicted = rng.integers(0, 4, 200), rng.integers(0, 5, 200)  # class 4 never true
    m = class_metrics(confusion_matrix(truth, predicted, 5), list("abcde"))
    p, r, f, s = skm.precision_recall_fscore_support(truth, predicted, labels=range(5), zero_division=0.0)
    assert [m["per_class"][c]["f1"] for c in "abcde"] == pytest.approx(100 * f, abs=1e-3)
    assert [m["per_class"][c]["support"] for c in "abcde"] == s.tolist()
    assert m["accuracy"] == pytest.approx(100 * np.mean(truth == predicted), abs=1e-3)
    assert m["balanced_accuracy"] == pytest.approx(100 * skm.balanced_accuracy_score(truth, predicted), abs=1e-3)
    assert class_metrics(np.zeros((2, 2), np.int64), ["a", "b"]) == {}


def test_without_scikit_learn_training_goes_on_and_says_how_to_get_the_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now fails
    out = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "need scikit-learn, a dependency of densenet that is missing" in printed and "pip install scikit-learn" in printed
    report = json.loads((out / "report.json").read_text())
    assert "test_macro_f1" not in report and report["test_top5_error"] is not None  # 10 classes: top-5 applies
    assert (out / "confusion.csv").is_file() and (out / "confusion.png").is_file()
    assert "test_macro_f1" not in next(csv.DictReader((out / "metrics.csv").open()))
    assert main(["eval", str(out / "checkpoint.pt")]) == 0
    assert "install it with: pip install scikit-learn" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- 3. splits and sampling
def test_held_out_split_is_stratified_and_seeded(tmp_path):
    root = write_image_tree(tmp_path / "f", {"": {"a": 20, "b": 10, "c": 5}})

    def split(seed: int):
        data = build_data("folder", root, image_size=32, val_fraction=0.2, workers=0, seed=seed)
        return data.test.indices, data.test.tree.labels[data.test.indices], data

    indices, labels, data = split(4)
    assert np.bincount(labels).tolist() == [4, 2, 1] and data.class_counts == [16, 8, 4]
    assert not set(indices) & set(data.train.indices) and len(indices) + data.train.num_images == 35
    assert (split(4)[0] == indices).all() and not (split(5)[0] == indices).all()


def test_classes_too_small_to_split_are_named_with_what_they_need(tmp_path):
    root = write_image_tree(tmp_path / "f", {"": {"a": 5, "b": 1, "c": 1}})
    with pytest.raises(DataError, match=r"too few images to hold out a test split \(10% of each class, at least 1 to test "
                                        r"and 1 to train on\): b has 1 image, needs 1 more; c has 1 image, needs 1 more"):
        build_data("folder", root, workers=0)


def test_bad_trees_are_named(tmp_path, capsys):
    one = write_image_tree(tmp_path / "one", {"": {"cats": 4}})
    assert main(["train", "--dataset", "folder", "--data", str(one), *MODEL, "--out", str(tmp_path / "r")]) == 2
    assert "one class only (cats/); a classifier needs at least 2 classes" in capsys.readouterr().err
    empty = write_image_tree(tmp_path / "empty", {"": {"cats": 4, "dogs": 4}})
    (empty / "owls").mkdir()
    (empty / "owls" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty class folder\\(s\\) in top level: owls \\(no images with suffix .jpg"):
        build_data("folder", empty)
    (empty / "owls" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (empty / "owls" / "good.png").write_bytes(image_bytes("PNG"))
    data = build_data("folder", empty, image_size=32, workers=0, batch_size=2)
    assert data.ignored == ["owls/readme.txt"]
    with pytest.raises(DataError, match="owls/broken.jpg: cannot decode image"):
        list(data.train.batches(0)) + list(data.test.batches(0))


def test_a_tree_wrapped_in_one_folder_is_found(tmp_path):
    zipped = write_image_tree(tmp_path / "own.zip", {"own": {"cats": 3, "dogs": 3}}, as_zip=True)
    data = build_data("folder", zipped, image_size=32, workers=0)
    assert data.class_names == ["cats", "dogs"] and data.train.num_images + data.test.num_images == 6


def test_images_of_mixed_modes_in_one_class_become_rgb(own):
    data = build_data("folder", own, image_size=32, workers=0, batch_size=16)
    batches = list(data.train.batches(0)) + list(data.test.batches(0))
    assert all(x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all() for x, _ in batches)
    assert sum(len(y) for _, y in batches) == data.train.num_batches * 16 + data.test.num_images
    assert len([f for f in data.train.tree.files if "mode" in f]) == len(MIXED_MODES)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks here")
def test_a_class_folder_linked_from_outside_the_tree_is_followed_once(tmp_path):
    root = write_image_tree(tmp_path / "own", {"": {"cats": 4}})
    elsewhere = write_image_tree(tmp_path / "elsewhere", {"": {"dogs": 5}})
    os.symlink(elsewhere / "dogs", root / "dogs")
    os.symlink(root, root / "cats" / "loop")  # a link back up: listed, not walked again
    data = build_data("folder", root, image_size=32, workers=0, batch_size=64)
    assert data.class_names == ["cats", "dogs"] and data.class_counts == [3, 4]
    x, y = next(data.test.batches(0))
    assert sorted(y.tolist()) == [0, 1]


def test_balanced_sampler_draws_classes_evenly_and_reproducibly():
    labels = np.r_[np.zeros(180, np.int64), np.ones(20, np.int64)]  # 9:1
    x = np.random.default_rng(0).integers(0, 256, (200, 3, 32, 32), dtype=np.uint8)

    def loader(balanced: bool, seed: int = 0) -> ArrayLoader:
        return ArrayLoader(x, labels, np.arange(200), 20, train=True, augment=True, seed=seed, mean=(0.5,) * 3,
                           std=(0.25,) * 3, prefetch=0, balanced=balanced)

    seen = torch.cat([y for _, y in loader(True).batches(0)])
    assert len(seen) == 200 and 70 < int(seen.sum()) < 130  # about half class 1, against 20 in a shuffle
    assert int(torch.cat([y for _, y in loader(False).batches(0)]).sum()) == 20
    full = list(loader(True).batches(3))
    resumed = list(loader(True).batches(3, start=4))  # a pure function of (seed, epoch, step)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[4:], resumed, strict=True))
    shards = [list(loader(True).batches(3, rank=r, world_size=2))[4][1] for r in (0, 1)]
    assert torch.equal(torch.cat(shards), full[4][1])
    assert not torch.equal(torch.cat([y for _, y in loader(True).batches(4)]), torch.cat([y for _, y in full]))
    with pytest.raises(DataError, match="balanced sampling is for training loaders"):
        ArrayLoader(x, labels, np.arange(200), 20, train=False, augment=False, seed=0, mean=(0.5,) * 3,
                    std=(0.25,) * 3, balanced=True)


def test_balanced_sampler_resume_is_bit_identical(tmp_path, monkeypatch, capsys):
    from densenet.training.distributed import Dist

    args = [*TINY, "--balanced-sampler", "--epochs", "2", "--checkpoint-every", "0"]
    reference = tmp_path / "reference"
    assert main(["train", *args, "--out", str(reference)]) == 0
    real, calls = Dist.sum, []

    def signal_after_step_3(self, values, device):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # acted on at the next step's read
        return real(self, values, device)

    monkeypatch.setattr(Dist, "sum", signal_after_step_3)
    out = tmp_path / "stopped"
    assert main(["train", *args, "--out", str(out)]) == 128 + signal.SIGTERM
    monkeypatch.setattr(Dist, "sum", real)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    a, b = load_checkpoint(reference / "checkpoint.pt")["model"], load_checkpoint(out / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((out / "config.yaml").read_text())["balanced_sampler"] is True


# ----------------------------------------------------------------------------------- 4. predict with the truth
def test_predict_with_the_truth_from_folders(run, own, tmp_path, capsys):
    out, _ = run
    table = tmp_path / "p.csv"
    assert main(["predict", str(out / "checkpoint.pt"), str(own), "--truth-from-folders", "--csv", str(table)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 89 and {r["true_class"] for r in rows} == {"cats", "dogs", "owls"}
    right = sum(r["true_class"] == r["class1"] for r in rows)
    assert f"truth from folders: 89 images, accuracy {100 * right / 89:.2f}% ({right} right)" in printed
    assert "true \\ predicted" in printed and "balanced accuracy" in printed
    assert list(rows[0]) == ["image", "true_class", "class1", "prob1", "class2", "prob2", "class3", "prob3"]

    stray = tmp_path / "stray" / "foxes"
    stray.mkdir(parents=True)
    (stray / "x.png").write_bytes(image_bytes("PNG"))
    assert main(["predict", str(out / "checkpoint.pt"), str(stray.parent), "--truth-from-folders"]) == 2
    err = capsys.readouterr().err
    assert "these folders are not classes: foxes/ (1 image, e.g." in err and "The classes: cats, dogs, owls" in err
