"""The short-budget recipe's parts: per-step learning-rate schedules with warm-up, label smoothing,
the exponential moving average of the weights (EMA), flip test-time augmentation, `--recipe budget`,
and their bad input. Values are checked against hand computations; resume is bit-identical."""
import csv
import dataclasses
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densenet import create_model
from densenet.analysis.plots import lr_drops
from densenet.cli import build_parser, main
from densenet.data import build_data
from densenet.io.checkpoint import load_checkpoint, save_checkpoint
from densenet.serving import model_from_checkpoint, model_from_safetensors
from densenet.training import ConfigError, evaluate, evaluate_tta, resolve_config, train
from densenet.training.config import RECIPES, TrainConfig, milestones
from densenet.training.ema import WeightAverage, ema_decay_at
from densenet.training.loop import learning_rate, load_run_config
from densenet.training.schedule import lr_at

# 128 images at batch 32: 4 steps per epoch
TINY = ["--model", "densenet_bc16_k8", "--dataset", "cifar10+", "--batch-size", "32", "--train-subset", "128",
        "--test-subset", "50", "--eval-batch-size", "50", "--threads", "1", "--quiet", "--seed", "5"]
RECIPE = ["--schedule", "cosine", "--warmup-epochs", "0.5", "--label-smoothing", "0.1", "--ema-decay", "0.9", "--ema-eval"]


def config(**values):
    return resolve_config({"epochs": 10, "lr": 0.1, **values})


# ---------------------------------------------------------------------------- schedules
def test_the_paper_step_schedule_is_the_per_epoch_value_of_before():
    """The default keeps the paper's numbers exactly: every step of an epoch gets the float the
    per-epoch schedule gave (lr times lr_gamma per milestone passed), so runs are unchanged."""
    for c in (config(), resolve_config({"dataset": "imagenet", "data": "x"}), config(lr_milestones=[2, 3], lr_gamma=0.5)):
        for epoch in range(c.epochs):
            before = c.lr * c.lr_gamma ** sum(epoch >= m for m in milestones(c))
            assert {lr_at(c, epoch * 7 + k, 7) for k in range(7)} == {before}
            assert learning_rate(c, epoch) == before
    c = config()  # milestones 5 and 7 of 10 epochs, 10 steps per epoch
    assert [lr_at(c, s, 10) for s in (0, 49, 50, 69, 70, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.parametrize(
    "values, expected",
    [
        # 10 epochs x 10 steps = 100 steps; u = (s - W) / (100 - W)
        ({"schedule": "cosine"}, {0: 0.1, 25: 0.1 * (1 + math.sqrt(0.5)) / 2, 50: 0.05, 75: 0.1 * (1 - math.sqrt(0.5)) / 2,
                                  99: 0.1 * (1 + math.cos(0.99 * math.pi)) / 2}),
        ({"schedule": "linear"}, {0: 0.1, 10: 0.09, 50: 0.05, 99: 0.001}),
        # warm-up 2 epochs = 20 steps: (s + 1) / 20 of 0.1, then linear over the 80 steps left
        ({"schedule": "linear", "warmup_epochs": 2}, {0: 0.005, 9: 0.05, 19: 0.1, 20: 0.1, 60: 0.05, 99: 0.00125}),
        # one-cycle: 0.01 -> 0.1 over u in [0, 0.45), -> 0.01 at 0.9, -> 0 at 1
        ({"schedule": "onecycle"}, {0: 0.01, 9: 0.01 + 0.09 * 0.09 / 0.45, 45: 0.1, 72: 0.1 - 0.09 * 0.27 / 0.45,
                                    90: 0.01, 95: 0.005, 99: 0.001}),
        # its warm-up rises to where one-cycle starts, lr / 10: 1 epoch = 10 steps, then 90 steps of cycle
        ({"schedule": "onecycle", "warmup_epochs": 1}, {0: 0.001, 4: 0.005, 9: 0.01, 10: 0.01, 30: 0.01 + 0.09 * (20 / 90) / 0.45,
                                                        55: 0.1 - 0.09 * 0.05 / 0.45}),
        # the step schedule keeps its milestones at their epochs (5 and 7); warm-up of half an epoch = 5 steps
        ({"warmup_epochs": 0.5}, {0: 0.02, 4: 0.1, 5: 0.1, 49: 0.1, 50: 0.01, 70: 0.001}),
        ({"warmup_epochs": 0.25}, {0: 0.1 / 3, 1: 0.2 / 3, 2: 0.1}),  # 2.5 steps round up to 3
    ],
)
def test_schedule_values_at_given_steps(values, expected):
    c = config(**values)
    got = {s: lr_at(c, s, 10) for s in expected}
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_the_lr_column_is_the_epochs_first_step_and_drops_are_marked_for_steps_only():
    c = config(schedule="linear", warmup_epochs=1)
    assert [learning_rate(c, e, 10) for e in (0, 1, 2)] == pytest.approx([0.01, 0.1, 0.1 * (1 - 10 / 90)])
    rows = lambda c: [{"epoch": e + 1, "lr": learning_rate(c, e, 10)} for e in range(c.epochs)]  # noqa: E731
    assert lr_drops(rows(config())) == [6, 8]  # the paper's: lr / 10 at epochs 5 and 7 (0-based)
    assert lr_drops(rows(config(lr_milestones=[3], lr_gamma=0.5))) == [4]  # a smaller drop, after a steady epoch
    for schedule in ("cosine", "linear", "onecycle"):
        assert lr_drops(rows(config(schedule=schedule, warmup_epochs=1))) == [], schedule


# ---------------------------------------------------------------------------- the weight average
def test_ema_against_a_hand_computation():
    """Four updates with decay 0.2: the decay warms up as min(0.2, (1 + n) / (10 + n)), so 0.1, 0.18..,
    then 0.2; weights and BN running statistics are averaged, num_batches_tracked copied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, 0.2)
    assert [ema_decay_at(0.2, n) for n in range(4)] == pytest.approx([0.1, 2 / 11, 0.2, 0.2])
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.999, 10**6) == 0.999
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    expected = {k: model.state_dict()[k].double().clone() for k in names}
    model.train()
    for d in [0.1, 2 / 11, 0.2, 0.2]:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3))  # moves the running statistics and num_batches_tracked
        average.update(model)
        for k in names:
            expected[k] = d * expected[k] + (1 - d) * model.state_dict()[k].double()
    got = average.model.state_dict()
    for k in names:
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-6, atol=1e-7)
    assert got["1.num_batches_tracked"] == model.state_dict()["1.num_batches_tracked"] == 4
    assert average.updates == 4 and not average.model.training
    assert not any(p.requires_grad for p in average.model.parameters())
    # a frozen tensor stays exactly what it was (lerp of equal values), e.g. with --freeze-features
    frozen = WeightAverage(model, 0.999)
    before = {k: v.clone() for k, v in frozen.model.state_dict().items()}
    frozen.update(model)
    assert all(torch.equal(before[k], v) for k, v in frozen.model.state_dict().items())


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """2 epochs of 4 steps with a cosine schedule, a warm-up, label smoothing and an EMA served."""
    out = tmp_path_factory.mktemp("recipe") / "ema"
    assert main(["train", *TINY, *RECIPE, "--epochs", "2", "--out", str(out)]) == 0
    return out


def rows_of(run):
    return list(csv.DictReader((run / "metrics.csv").open()))


def test_a_run_with_the_recipe_parts_records_both_weights(ema_run):
    rows = rows_of(ema_run)
    assert list(rows[0])[:13] == ["epoch", "train_loss", "train_error", "val_error", "test_error", "test_top5_error", "lr",
                                  "seconds", "images_per_s", "eval_seconds", "ema_val_error", "ema_test_error",
                                  "ema_test_top5_error"]
    assert all(r["ema_test_error"] != "" and r["ema_val_error"] == "" for r in rows)  # no validation split
    state = load_checkpoint(ema_run / "checkpoint.pt")
    c = TrainConfig(**state["config"])
    assert [float(r["lr"]) for r in rows] == [lr_at(c, 0, 4), lr_at(c, 4, 4)] == pytest.approx([0.05, 0.1 * (1 + math.cos(
        math.pi * 2 / 6)) / 2])  # warm-up of 2 steps: 1/2 of 0.1; then cosine over 6 steps, at step 4: u = 2/6
    assert state["optimizer"]["param_groups"][0]["lr"] == lr_at(c, 7, 4)  # set before every step: the last one's
    assert state["ema"]["updates"] == 8  # one per step
    report = json.loads((ema_run / "report.json").read_text())
    assert report["weights"] == "average" and report["test_error"] == float(rows[-1]["ema_test_error"])
    assert report["raw_test_error"] == float(rows[-1]["test_error"])
    # eval, predict and export take the average (--ema-eval), or the raw weights with --ema no
    average, info = model_from_checkpoint(ema_run / "checkpoint.pt")
    raw, _ = model_from_checkpoint(ema_run / "checkpoint.pt", ema=False)
    assert info["ema"] is True
    assert all(torch.equal(average.state_dict()[k], v) for k, v in state["ema"]["model"].items())
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in state["model"].items())
    for choice, weights in (("auto", state["ema"]["model"]), ("no", state["model"])):
        path = ema_run.parent / f"{choice}.safetensors"
        assert main(["export", str(ema_run / "checkpoint.pt"), "--format", "safetensors", "--out", str(path),
                     "--ema", choice]) == 0
        exported, _ = model_from_safetensors(path)
        assert all(torch.equal(exported.state_dict()[k], v) for k, v in weights.items() if v.is_floating_point())


def test_label_smoothing_is_in_the_training_loss(tmp_path):
    """The loss of a run's first step (one step of 32 images, from known weights, before any update)
    is cross-entropy with label smoothing 0.3 when asked, plain cross-entropy by default."""
    torch.manual_seed(0)
    model = create_model("densenet_bc16_k8", num_classes=10)
    with torch.no_grad():
        model.classifier.weight.mul_(20)  # larger logits, on which smoothing weighs more
    torch.save(model.state_dict(), tmp_path / "init.pth")
    args = [*TINY, "--dataset", "cifar10", "--drop-rate", "0", "--amp", "off", "--train-subset", "32", "--epochs", "1",
            "--init", str(tmp_path / "init.pth")]
    losses = {}
    for smoothing in ("0", "0.3"):
        assert main(["train", *args, "--label-smoothing", smoothing, "--out", str(tmp_path / smoothing)]) == 0
        losses[smoothing] = float(rows_of(tmp_path / smoothing)[0]["train_loss"])
    data = build_data("cifar10", None, batch_size=32, eval_batch_size=50, seed=5, workers=0, train_subset=32,
                      test_subset=50)
    images, labels = next(iter(data.train.batches(0)))
    with torch.no_grad():
        logits = model.train()(images)
    assert losses["0"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert losses["0.3"] == pytest.approx(float(F.cross_entropy(logits, labels, label_smoothing=0.3)), rel=1e-5)
    assert abs(losses["0.3"] - losses["0"]) > 1e-3  # far beyond the tolerance above: the two are told apart


def test_resume_with_ema_and_a_cosine_schedule_is_bit_identical(ema_run, tmp_path, capsys, monkeypatch):
    """Stopped by a signal mid-way through epoch 2 and resumed: the weights, their average, the
    learning rates and every metric equal those of the uninterrupted run."""
    from densenet.training.distributed import Dist

    real, calls = Dist.sum, []

    def reduce_then_signal(self, values, device):
        out = real(self, values, device)
        calls.append(1)
        if len(calls) == 6:  # epoch 1: 4 steps + the epoch-end check; then epoch 2's first step
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Dist, "sum", reduce_then_signal)
    out = tmp_path / "stopped"
    assert main(["train", *TINY, *RECIPE, "--epochs", "2", "--out", str(out)]) == 128 + signal.SIGTERM
    assert "at epoch 2, step 2; checkpoint written" in capsys.readouterr().err
    stopped = load_checkpoint(out / "checkpoint.pt")
    assert (stopped["epoch"], stopped["step"], stopped["ema"]["updates"]) == (1, 2, 6)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    a, b = load_checkpoint(ema_run / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    for key in ("model", "ema"):
        ta, tb = (a[key], b[key]) if key == "model" else (a[key]["model"], b[key]["model"])
        assert [k for k in ta if not torch.equal(ta[k], tb[k])] == [], key
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    columns = ("train_loss", "train_error", "test_error", "ema_test_error", "lr")
    assert [[r[k] for k in columns] for r in rows_of(ema_run)] == [[r[k] for k in columns] for r in rows_of(out)]


# ---------------------------------------------------------------------------- flip test-time augmentation
def test_flip_tta_is_the_average_of_the_two_softmaxes_beside_the_single_crop():
    torch.manual_seed(1)
    model = create_model("densenet_bc16_k8", num_classes=4).eval()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    single, averaged = evaluate_tta(model, [(x[:4], y[:4]), (x[4:], y[4:])], torch.device("cpu"))
    plain = evaluate(model, [(x[:4], y[:4]), (x[4:], y[4:])], torch.device("cpu"))
    assert (single.top1, single.images, single.loss_sum) == (plain.top1, plain.images, plain.loss_sum)
    assert torch.equal(single.confusion, plain.confusion)
    with torch.no_grad():
        probs = (F.softmax(model(x), 1) + F.softmax(model(torch.flip(x, dims=[3])), 1)) / 2
    assert averaged.top1 == int((probs.argmax(1) == y).sum())
    assert averaged.loss == pytest.approx(float(F.nll_loss(probs.log(), y)), rel=1e-5)
    assert averaged.confusion.sum() == 6


def test_eval_and_predict_print_the_flip_figure_beside_the_single_crop(ema_run, tmp_path, capsys):
    assert main(["eval", str(ema_run / "checkpoint.pt"), "--tta", "flip", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    single = out.index("cifar10+ test set, 200 images: top-1 error")
    assert "(weight average)" in out.splitlines()[0]
    assert out.index("flip-averaged (--tta flip): top-1 error") > single
    summary = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert {"top1_error", "top5_error", "tta_top1_error", "tta_top5_error"} <= set(summary)
    assert summary["tta"] == "flip" and summary["weights"] == "average"
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["predict", str(ema_run / "checkpoint.pt"), str(tmp_path / "red.png"), "--tta", "flip", "--top", "3",
                 "--csv", str(tmp_path / "p.csv")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tmp_path / 'red.png'}: ") and "; flip-averaged: " in line
    header, row = list(csv.reader((tmp_path / "p.csv").open()))
    assert header == ["image", "class1", "prob1", "class2", "prob2", "class3", "prob3",
                      "flip_class1", "flip_prob1", "flip_class2", "flip_prob2", "flip_class3", "flip_prob3"]
    assert row[1:7:2] == row[7::2]  # a uniform image is its own mirror: the same classes and probabilities
    assert [float(p) for p in row[2:7:2]] == pytest.approx([float(p) for p in row[8::2]], abs=1e-6)


def test_tta_on_a_model_whose_input_is_not_an_image_is_refused(tmp_path, capsys):
    model = create_model("densenet_bc16_k8", num_classes=2, spatial_dims=1, in_channels=3)
    save_checkpoint(tmp_path / "signals.pt", {
        "config": {"model": "densenet_bc16_k8"}, "model_config": model.config(), "model": model.state_dict(),
        "data": {"class_names": ["a", "b"], "mean": [0.0], "std": [1.0], "image_size": 64, "dataset": "signals"}})
    for command in (["eval", str(tmp_path / "signals.pt"), "--tta", "flip", "--data", str(tmp_path)],
                    ["predict", str(tmp_path / "signals.pt"), str(tmp_path / "x.png"), "--tta", "flip"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "--tta flip averages each image with its horizontal mirror, but this model takes 1-D signals" in err, err
        assert "drop --tta" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="takes 1-D signals"):
        evaluate_tta(model, [], torch.device("cpu"))


# ---------------------------------------------------------------------------- the named recipe
def test_the_budget_recipe_sets_its_values_and_explicit_ones_win(tmp_path):
    budget = resolve_config({"recipe": "budget"})
    assert {k: getattr(budget, k) for k in RECIPES["budget"]} == RECIPES["budget"]
    assert (budget.schedule, budget.warmup_epochs, budget.label_smoothing, budget.ema_decay, budget.ema_eval) == (
        "linear", 1.0, 0.1, 0.999, True)
    assert (budget.epochs, budget.batch_size) == (8, 64)  # how long is the user's (or the dataset's) choice
    paper = resolve_config({"data": "cifar-10-binary.tar.gz"})
    assert (paper.recipe, paper.schedule, paper.warmup_epochs, paper.label_smoothing, paper.ema_decay, paper.ema_eval,
            paper.weight_decay) == ("paper", "step", 0.0, 0.0, None, False, 1e-4)
    mine = resolve_config({"recipe": "budget", "lr": 0.2, "schedule": "cosine", "label_smoothing": 0.0})
    assert (mine.lr, mine.schedule, mine.label_smoothing, mine.weight_decay) == (0.2, "cosine", 0.0, 5e-4)
    args = vars(build_parser().parse_args(["train", "--recipe", "budget", "--ema-decay", "none"]))
    off = resolve_config({k: args[k] for k in ("recipe", "ema_decay")})
    assert (off.ema_decay, off.ema_eval) == (None, False)  # the recipe's --ema-eval goes with its average
    (tmp_path / "c.yaml").write_text("recipe: budget\nepochs: 30\nwarmup_epochs: 2\n")
    from_file = resolve_config({"lr": 0.15}, tmp_path / "c.yaml")
    assert (from_file.recipe, from_file.epochs, from_file.warmup_epochs, from_file.lr, from_file.schedule) == (
        "budget", 30, 2.0, 0.15, "linear")


def test_train_help_says_what_the_budget_recipe_sets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside the flags
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--schedule linear --warmup-epochs 1 --lr 0.1 --momentum 0.9 --nesterov --weight-decay 0.0005" in text
    assert "Li et al., ICLR 2020" in text and "airbench" in text and "Smith 2018" in text


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "2", "--warmup-epochs", "2"], "warmup_epochs (--warmup-epochs) 2 is not shorter than the run (2 epochs)"),
        (["--epochs", "3", "--warmup-epochs", "-1"], "warmup_epochs (--warmup-epochs) must be a non-negative"),
        (["--epochs", "1", "--schedule", "onecycle"], "schedule onecycle needs at least 2 epochs after the warm-up"),
        (["--epochs", "2", "--schedule", "onecycle", "--warmup-epochs", "0.5"], "train for more --epochs"),
        (["--label-smoothing", "1"], "label_smoothing (--label-smoothing) must be in [0, 1), got 1.0"),
        (["--label-smoothing", "-0.1"], "label_smoothing (--label-smoothing) must be in [0, 1)"),
        (["--ema-decay", "1"], "ema_decay (--ema-decay) must be in (0, 1), got 1.0"),
        (["--ema-decay", "0"], "ema_decay (--ema-decay) must be in (0, 1), got 0.0"),
        (["--ema-decay", "nan"], "ema_decay (--ema-decay) must be in (0, 1)"),
        (["--ema-eval"], "give --ema-decay (e.g. 0.999) or drop --ema-eval"),
        (["--schedule", "exponential"], "schedule (--schedule) must be one of step, cosine, linear, onecycle"),
        (["--recipe", "fast"], "unknown recipe 'fast' (--recipe / recipe:); use one of paper, budget"),
    ],
)
def test_bad_recipe_input_fails_before_anything_is_written(argv, message, tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_resuming_with_another_recipe_or_schedule_is_refused(ema_run, capsys):
    before = {p.name: p.read_bytes() for p in ema_run.iterdir() if p.is_file()}
    for argv, changed in ((["--recipe", "budget"], "recipe"), (["--schedule", "linear"], "schedule"),
                          (["--ema-decay", "0.99"], "ema_decay"), (["--no-ema-eval"], "ema_eval"),
                          (["--label-smoothing", "0"], "label_smoothing"), (["--warmup-epochs", "1"], "warmup_epochs")):
        assert main(["train", "--resume", str(ema_run), *argv]) == 2
        err = capsys.readouterr().err
        assert f"cannot resume {ema_run} with a changed {changed} (the run was started with {changed}=" in err, err
        assert f"drop --{changed.replace('_', '-')} to continue it as it started" in err
    assert {p.name: p.read_bytes() for p in ema_run.iterdir() if p.is_file()} == before  # nothing touched
    assert load_run_config(ema_run, {"schedule": "cosine", "ema_decay": 0.9}).schedule == "cosine"  # the same: fine
    changed = dataclasses.replace(load_run_config(ema_run, {}), schedule="linear")  # through the API, not the CLI
    with pytest.raises(ConfigError, match=r"changed schedule: its checkpoint was trained with schedule='cosine'"):
        train(changed, resume=True)
    assert {p.name: p.read_bytes() for p in ema_run.iterdir() if p.is_file()} == before


def test_ema_choices_that_do_not_fit_are_refused(ema_run, tmp_path, capsys):
    c = load_checkpoint(ema_run / "checkpoint.pt")
    c.pop("ema")
    c.pop("checksum", None)
    save_checkpoint(tmp_path / "no-ema.pt", c)
    assert main(["eval", str(tmp_path / "no-ema.pt"), "--ema", "yes"]) == 2
    assert "holds no weight average: its run was trained without --ema-decay" in capsys.readouterr().err
    assert main(["eval", "--model", "densenet_bc40_k12", "--weights", "cifar10", "--ema", "no"]) == 2
    assert "named weights (cifar10) are one set: drop --ema" in capsys.readouterr().err
