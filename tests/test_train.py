"""`densenet train`, `eval` and `predict` end to end on the bundled sample and on generated folders."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from densenet.cli import main
from densenet.io.checkpoint import load_checkpoint
from densenet.training.loop import load_run_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "densenet_bc16_k8", "--dataset", "cifar10+", "--batch-size", "32", "--train-subset", "256",
        "--test-subset", "100", "--eval-batch-size", "100", "--threads", "1", "--quiet", "--seed", "3"]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densenet", *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoint.pt")["model"]


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sample"
    assert main(["train", *TINY, "--epochs", "3", "--out", str(out), "--val-size", "64"]) == 0
    return out


def test_run_directory_holds_everything(sample_run):
    names = {p.name for p in sample_run.iterdir()}
    assert {"config.yaml", "metrics.csv", "curves.png", "checkpoint.pt", "report.json", "tensorboard"} <= names
    rows = list(csv.DictReader((sample_run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert list(rows[0])[:10] == ["epoch", "train_loss", "train_error", "val_error", "test_error", "test_top5_error", "lr",
                                 "seconds", "images_per_s", "eval_seconds"]  # then the class metrics (tests/test_own_data.py)
    assert {"test_macro_f1", "test_balanced_accuracy", "test_f1[cat]"} <= set(rows[0])
    assert [float(r["lr"]) for r in rows] == [0.1, 0.1, 0.1]  # 3 epochs: milestones 50%/75% need >= 4
    assert all(float(r["images_per_s"]) > 0 and 0 <= float(r["test_error"]) <= 100 for r in rows)
    report = json.loads((sample_run / "report.json").read_text())
    assert report["test_error"] == pytest.approx(float(rows[-1]["test_error"]))
    assert report["best_val_error"] == min(float(r["val_error"]) for r in rows)
    assert report["epochs"] == 3 and report["parameters"] > 0
    with Image.open(sample_run / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 500
    assert list((sample_run / "tensorboard").glob("events.out.tfevents.*"))
    config = (sample_run / "config.yaml").read_text()
    assert "model: densenet_bc16_k8" in config and "nesterov: true" in config and "weight_decay: 0.0001" in config


def test_the_plan_and_an_estimated_time_come_before_training(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    plan = out.index("plan: densenet_bc16_k8 (")
    assert ("on cifar10+ from the bundled CIFAR-10 sample: 256 training images, 1 epochs x 8 steps = 8 steps of "
            "batch 32, device cpu") in out
    assert "give --data for a real dataset and the paper's recipe" in out
    estimate = re.search(r"estimated training time: \d+ s for the remaining 2 steps \(\d+\.\d\d s per step", out)
    assert estimate and plan < estimate.start() < out.index("epoch 1/1:")


def test_a_signal_after_the_all_reduce_stops_every_rank_at_the_same_next_step(tmp_path, capsys, monkeypatch):
    """The stop decision comes from the all-reduced flag only: a SIGTERM that arrives after a step's
    all-reduce has taken the flags is acted on at the next one, on every rank alike, never by the
    signalled rank alone (its collectives would no longer match the others')."""
    from densenet.training.distributed import Dist

    real, calls = Dist.sum, []

    def reduce_then_signal(self, values, device):
        out = real(self, values, device)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives once step 3's flags are reduced
        return out

    monkeypatch.setattr(Dist, "sum", reduce_then_signal)
    out = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 128 + signal.SIGTERM
    assert "stopped by signal 15 at epoch 1, step 4; checkpoint written" in capsys.readouterr().err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4 and len(calls) == 4


def test_reading_metrics_every_few_steps_changes_nothing(sample_run, tmp_path):
    """--sync-every 3 (the loss and hits stay on the device between reads, as on a GPU): the same
    weights and the same metrics as reading them every step."""
    out = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "3", "--out", str(out), "--val-size", "64", "--sync-every", "3"]) == 0
    assert_bit_identical(weights(out), weights(sample_run))
    a, b = (list(csv.DictReader((run / "metrics.csv").open())) for run in (out, sample_run))
    keys = ("train_loss", "train_error", "val_error", "test_error")
    assert [[float(r[k]) for k in keys] for r in a] == [[float(r[k]) for k in keys] for r in b]


def test_evaluating_every_few_epochs_skips_only_the_evaluations(sample_run, tmp_path, capsys):
    """--eval-every 2 over 3 epochs: epoch 2 and the last are evaluated, epoch 1 leaves its evaluation
    columns empty; the weights, the training columns and the final report are those of evaluating
    every epoch, and the curves are still drawn."""
    out = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "3", "--out", str(out), "--val-size", "64", "--eval-every", "2"]) == 0
    log = capsys.readouterr().out
    assert_bit_identical(weights(out), weights(sample_run))
    a, b = (list(csv.DictReader((run / "metrics.csv").open())) for run in (out, sample_run))
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["test_error"] != "" for r in a] == [False, True, True]
    assert a[0]["val_error"] == a[0]["eval_seconds"] == a[0]["test_macro_f1"] == ""
    assert [r["test_error"] for r in a[1:]] == [r["test_error"] for r in b[1:]]
    epoch1 = next(line for line in log.splitlines() if line.startswith("epoch 1/3:"))
    assert "test error" not in epoch1 and "test error" in next(line for line in log.splitlines() if line.startswith("epoch 2/3:"))
    report, reference = (json.loads((run / "report.json").read_text()) for run in (out, sample_run))
    assert report["test_error"] == reference["test_error"] and report["best_val_error"] == min(
        float(r["val_error"]) for r in a[1:])
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG"
    assert load_run_config(out, {"eval_every": 1}).eval_every == 1  # how often it evaluates may change on resume


def test_training_learns_on_the_sample(sample_run):
    rows = list(csv.DictReader((sample_run / "metrics.csv").open()))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_eval_and_predict_a_checkpoint(sample_run, tmp_path, capsys):
    assert main(["eval", str(sample_run / "checkpoint.pt")]) == 0
    out = capsys.readouterr().out
    assert "top-1 error" in out and "top-5 error" in out
    # images written in real formats: a greyscale PNG and an RGBA one
    Image.new("L", (40, 30), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (32, 32), (200, 10, 10, 128)).save(tmp_path / "red.png")
    assert main(["predict", str(sample_run / "checkpoint.pt"), str(tmp_path), "--csv", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith(str(tmp_path / "grey.png"))
    classes = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
    assert sum(name in out[0] for name in classes) == 5
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert rows[0][:3] == ["image", "class1", "prob1"] and len(rows) == 3
    probs = [float(x) for x in rows[1][2::2]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_predict_bad_image_is_named(sample_run, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["predict", str(sample_run / "checkpoint.pt"), str(tmp_path / "broken.jpg")]) == 2
    assert "cannot decode image" in capsys.readouterr().err


def test_out_directory_of_another_run_is_refused_unless_force(sample_run, tmp_path, capsys):
    before = (sample_run / "checkpoint.pt").read_bytes()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(sample_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (sample_run / "checkpoint.pt").read_bytes() == before
    out = tmp_path / "again"
    assert main(["train", *TINY, "--epochs", "1", "--train-subset", "64", "--out", str(out)]) == 0
    assert main(["train", *TINY, "--epochs", "1", "--train-subset", "64", "--out", str(out), "--force"]) == 0


def test_resume_refuses_missing_corrupted_or_changed(sample_run, tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "holds no run" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_bytes((sample_run / "config.yaml").read_bytes())
    data = (sample_run / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    assert main(["train", "--resume", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupted" in err and "left as they are" in err
    assert (broken / "checkpoint.pt").read_bytes() == data[: len(data) // 3]
    assert main(["train", "--resume", str(sample_run), "--model", "densenet40_k12"]) == 2
    assert "changed model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "cifar11"], "cifar11"),
        (["--model", "densenet12"], "did you mean 'densenet121'"),
        (["--dataset", "svhn", "--data", "/nonexistent/svhn"], "/nonexistent/svhn"),
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--eval-every", "0"], "eval_every (--eval-every) must be at least 1 epoch"),
        (["--schedule", "plateau", "--val-size", "64", "--eval-every", "2"], "use --eval-every 1 with --schedule plateau"),
        (["--dataset", "cifar10", "--data", "{tmp}/cifar-10-binary.tar.gz"],
         "neither a tar archive (the official cifar10 release) nor a zip"),
        (["--dataset", "cifar100", "--data", "{tmp}"], "Expected one of: cifar-100-binary.tar.gz"),
    ],
)
def test_bad_training_input_fails_before_training(argv, message, tmp_path, capsys):
    (tmp_path / "cifar-10-binary.tar.gz").write_text("not an archive")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["train", "--out", str(tmp_path / "r"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(["train", *TINY, "--epochs", "1", "--lr", "1e12", "--checkpoint-every", "1", "--out", str(out)])
    assert code == 3
    assert "diverged" in capsys.readouterr().err
    if (out / "checkpoint.pt").exists():
        assert all(torch.isfinite(v).all() for v in weights(out).values() if v.is_floating_point())


def kill_when(proc: subprocess.Popen, path: Path, sig: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(0.3)  # a moment later: mid-step, mid-epoch
    proc.send_signal(sig)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    args = [*TINY, "--epochs", "2", "--deterministic", "--checkpoint-every", "2", "--drop-rate", "0.1"]
    reference = tmp_path / "reference"
    assert run_cli("train", *args, "--out", str(reference)).returncode == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "densenet", "train", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when(proc, out / "checkpoint.pt", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(out / "checkpoint.pt")
    assert (state["epoch"], state["step"]) != (2, 0), "the run finished before the kill"
    resumed = run_cli("train", "--resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert_bit_identical(weights(reference), weights(out))
    ref_rows = list(csv.DictReader((reference / "metrics.csv").open()))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    for a, b in zip(ref_rows, rows, strict=True):
        assert (a["train_loss"], a["train_error"], a["test_error"]) == (b["train_loss"], b["train_error"], b["test_error"])


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_a_checkpoint(tmp_path):
    out = tmp_path / "term"
    args = [*TINY, "--epochs", "2", "--deterministic", "--checkpoint-every", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "densenet", "train", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when(proc, out / "checkpoint.pt", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "--resume" in proc.stderr.read()
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] > 0 or state["epoch"] > 0
    assert run_cli("train", "--resume", str(out), "--quiet").returncode == 0
    reference = tmp_path / "reference"
    assert run_cli("train", *args, "--out", str(reference)).returncode == 0
    assert_bit_identical(weights(reference), weights(out))


@pytest.mark.slow
def test_resume_may_change_the_precision_and_says_so(tmp_path):
    """A bfloat16 run moved to a machine without bfloat16 instructions goes on in float32 (--amp off on
    resume): the resume says the steps are no longer bit-identical, config.yaml keeps the new precision,
    and the run finishes its epochs; resuming again in that precision says nothing."""
    out = tmp_path / "moved"
    args = [*TINY, "--epochs", "2", "--checkpoint-every", "3", "--amp", "bf16"]
    proc = subprocess.Popen([sys.executable, "-m", "densenet", "train", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when(proc, out / "checkpoint.pt", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    assert load_checkpoint(out / "checkpoint.pt")["config"]["amp"] == "bf16"
    resumed = run_cli("train", "--resume", str(out), "--quiet", "--amp", "off")
    assert resumed.returncode == 0, resumed.stderr
    assert "the precision changes on resume, from amp bf16 to off" in resumed.stderr
    assert load_checkpoint(out / "checkpoint.pt")["config"]["amp"] == "off"
    assert "amp: 'off'" in (out / "config.yaml").read_text() or "amp: off" in (out / "config.yaml").read_text()
    assert len(list(csv.DictReader((out / "metrics.csv").open()))) == 2
    unchanged = run_cli("train", "--resume", str(out), "--quiet", "--amp", "off")  # the same precision: no note
    assert unchanged.returncode == 0 and "precision changes" not in unchanged.stderr


def write_folder_dataset(root: Path, classes=("cats", "dogs", "owls"), per_split=(12, 4)) -> None:
    g = torch.Generator().manual_seed(0)
    for split, n in zip(("train", "val"), per_split):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(36, 36, 3, generator=g) * 60 + 60 * c).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")


@pytest.mark.slow
def test_init_from_torchvision_state_dict_reinitialises_a_different_head(tmp_path, capsys):
    data = tmp_path / "pets"
    write_folder_dataset(data)
    tv = torchvision.models.densenet121(weights=None)
    torch.save(tv.state_dict(), tmp_path / "densenet121.pth")
    out = tmp_path / "ft"
    assert main(["train", "--dataset", "folder", "--data", str(data), "--model", "densenet121", "--image-size", "64",
                 "--epochs", "1", "--batch-size", "12", "--quiet", "--threads", "2", "--out", str(out),
                 "--init", str(tmp_path / "densenet121.pth"), "--freeze-features", "--workers", "0"]) == 0
    trained = weights(out)
    for key in ("features.conv0.weight", "features.denseblock4.denselayer16.conv2.weight", "features.norm5.running_mean"):
        assert torch.equal(trained[key], tv.state_dict()[key]), key  # frozen: weights and BN statistics
    assert trained["classifier.weight"].shape == (3, 1024)
    # the ImageNet evaluation of such a checkpoint: single crop and the paper's 10-crop
    assert main(["eval", str(out / "checkpoint.pt"), "--dataset", "imagenet", "--data", str(data), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"imagenet test set, 12 images: top-1 error [\d.]+%\n", printed)  # 3 classes: no top-5
    assert re.search(r"10-crop: top-1 error [\d.]+%\n", printed)


def test_second_training_on_the_same_run_folder_is_refused(tmp_path, capsys):
    """While one training holds a run folder, another (a resume, or a fresh start with --force) is
    refused with the holder's pid; once the first is gone (even SIGKILLed) the folder is free."""
    out = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-m", "densenet", "train", *TINY, "--epochs", "50", "--checkpoint-every", "2",
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.02)
        assert main(["train", "--resume", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "in use by another training" in err and str(proc.pid) in err, err
        assert main(["train", *TINY, "--epochs", "1", "--out", str(out), "--force"]) == 2
        assert str(proc.pid) in capsys.readouterr().err
        assert (out / "checkpoint.pt").exists()  # --force deleted nothing of the running training
    finally:
        proc.kill()
        proc.wait()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out), "--force"]) == 0


def test_a_step_that_cannot_fit_in_memory_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "huge"
    code = main(["train", "--model", "densenet_bc250_k24", "--batch-size", "65536", "--epochs", "1", "--quiet",
                 "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "not enough memory" in err and "--memory-efficient" in err and "--batch-size of at most" in err, err
    assert not (out / "checkpoint.pt").exists()
