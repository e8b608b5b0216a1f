"""The paper's analyses as commands: `densenet reuse` (Figure 5), `densenet table` (Tables 2 and 3)
and `densenet plot` (learning curves, parameter efficiency), on runs trained on the bundled sample."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densenet import DenseNet
from densenet.analysis.reuse import feature_reuse
from densenet.cli import main
from densenet.serving import model_from_checkpoint

TINY = ["--dataset", "cifar10+", "--batch-size", "32", "--train-subset", "128", "--test-subset", "64",
        "--eval-batch-size", "64", "--threads", "1", "--quiet", "--seed", "3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two models, 4 epochs each: the learning rate drops after epochs 2 and 3 (50% and 75%)."""
    root = tmp_path_factory.mktemp("analysis")
    out = []
    for model in ("densenet_bc16_k8", "densenet16_k8"):
        assert main(["train", "--model", model, *TINY, "--epochs", "4", "--out", str(root / model)]) == 0
        out.append(root / model)
    return out


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


# ---------------------------------------------------------------------------- reuse
# k = 2, stem 4 maps: block 1 reads 4 input maps then 2 per layer (3 layers, 10 maps out); the
# transition keeps 5; block 2 reads those 5 then 2 per layer (2 layers, 9 maps out, the classifier's input)
CHANNELS = {1: [(0, 4), (4, 6), (6, 8), (8, 10)], 2: [(0, 5), (5, 7), (7, 9)]}


def planted(bottleneck: bool, num_classes: int = 4) -> tuple[DenseNet, dict]:
    """A model whose first convolutions hold, for each (block, source, target), weights of one
    magnitude (with random signs): the expected reuse matrix entries."""
    torch.manual_seed(0)
    model = DenseNet(growth_rate=2, block_config=(3, 2), bottleneck=bottleneck, compression=0.5, num_classes=num_classes)
    expected = {}
    with torch.no_grad():
        for b, block in enumerate([model.features.denseblock1, model.features.denseblock2], start=1):
            layers = list(block.values())
            readers = [layer.conv1 for layer in layers] + [model.features.transition1.conv if b == 1 else model.classifier]
            for l, reader in enumerate(readers, start=1):
                if isinstance(reader, torch.nn.Identity):
                    continue
                assert reader.weight.shape[1] == CHANNELS[b][l - 1][1]
                for s, (start, stop) in enumerate(CHANNELS[b][:l]):
                    sl = slice(start, stop)
                    value = 0.01 * (b * 100 + s * 10 + l)
                    w = reader.weight[:, sl]
                    w.copy_(value * torch.where(torch.rand_like(w) < 0.5, -1.0, 1.0))
                    expected[b, s, l] = value
    return model, expected


@pytest.mark.parametrize("bottleneck", [True, False])
def test_reuse_matrix_recovers_planted_weights(bottleneck):
    model, expected = planted(bottleneck)
    blocks = feature_reuse(model)
    assert [(b.block, b.num_layers, b.matrix.shape) for b in blocks] == [(1, 3, (4, 4)), (2, 2, (3, 3))]
    assert blocks[0].target_names[0] == "features.denseblock1.denselayer1.conv1"
    assert blocks[0].reader == "features.transition1.conv" and blocks[1].reader == "classifier"
    for b in blocks:
        for s in range(b.num_layers + 1):
            for l in range(1, b.num_layers + 2):
                got = b.matrix[s, l - 1]
                if (b.block, s, l) in expected:
                    assert got == pytest.approx(expected[b.block, s, l], rel=1e-6), (b.block, s, l)
                else:  # layer l reads sources 0..l-1 only
                    assert s >= l and math.isnan(got), (b.block, s, l)
        scaled = b.scaled()
        assert np.allclose(np.nanmax(scaled, axis=0), 1.0)
        last = b.num_layers  # the reader column: source s scaled by the largest, s = L
        assert scaled[0, last] == pytest.approx(expected[b.block, 0, last + 1] / expected[b.block, b.num_layers, last + 1])


def test_reuse_without_classifier_leaves_the_last_column_empty():
    model, _ = planted(True, num_classes=0)
    last = feature_reuse(model)[-1]
    assert last.reader == "(no classifier)" and np.isnan(last.matrix[:, -1]).all()


def test_reuse_command_on_a_trained_run(runs, tmp_path, capsys):
    run = runs[0]
    out = tmp_path / "reuse.png"
    assert main(["reuse", str(run / "checkpoint.pt"), "--out", str(out)]) == 0
    assert "3 dense blocks" in capsys.readouterr().out
    width, height = png_size(out)
    assert width > 900 and height > 300
    rows = list(csv.DictReader((tmp_path / "reuse.csv").open()))
    model, _ = model_from_checkpoint(run / "checkpoint.pt")
    blocks = feature_reuse(model)
    # every existing pair once: L(L+1)/2 inside the block and L+1 into its reader
    assert len(rows) == sum(b.num_layers * (b.num_layers + 1) // 2 + b.num_layers + 1 for b in blocks) == 3 * 6
    for r in rows:
        b = blocks[int(r["block"]) - 1]
        assert float(r["mean_abs_weight"]) == pytest.approx(b.matrix[int(r["source"]), int(r["target"]) - 1], rel=1e-6)
    readers = {r["target_layer"] for r in rows if r["target"] == "3"}
    assert readers == {"features.transition1.conv", "features.transition2.conv", "classifier"}
    # a classifier weight computed by hand: block 3's input (16 maps) is the first 16 of the classifier's 32 inputs
    w = model.classifier.weight.detach().abs()
    first = next(r for r in rows if r["block"] == "3" and r["source"] == "0" and r["target"] == "3")
    assert float(first["mean_abs_weight"]) == pytest.approx(float(w[:, :16].mean()), rel=1e-6)


# ---------------------------------------------------------------------------- table
def write_run(folder: Path, model: str, dataset: str, error: float, top5: float = 1.0, epochs: int = 300) -> Path:
    """A finished run directory as `densenet train` leaves it (report and configuration), for a
    model too big to train in a test."""
    folder.mkdir(parents=True)
    report = {"model": model, "dataset": dataset, "parameters": 1, "epochs": epochs, "test_error": error,
              "test_top5_error": top5}
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "config.yaml").write_text(f"model: {model}\ndataset: {dataset}\ndata: data/archive.tar.gz\nepochs: {epochs}\n")
    return folder


def test_table_of_trained_runs_beside_the_paper(runs, tmp_path, capsys):
    extra = [write_run(tmp_path / f"bc100-{i}", "densenet_bc100_k12", "cifar10+", e) for i, e in enumerate((4.5, 5.0))]
    extra.append(write_run(tmp_path / "bc100-c100", "densenet_bc100_k12", "cifar100+", 23.0))
    extra.append(write_run(tmp_path / "d121", "densenet121", "imagenet", 25.5, 8.0, epochs=90))
    budget = write_run(tmp_path / "d40-budget", "densenet40_k12", "cifar10+", 6.0, epochs=30)
    with (budget / "config.yaml").open("a") as f:
        f.write("recipe: budget\n")
    report = json.loads((budget / "report.json").read_text())
    report.update(hardware="AMD EPYC 9R14, 2 cores", train_seconds=7200.0, weights="average")
    (budget / "report.json").write_text(json.dumps(report))
    extra.append(budget)
    md, table_csv = tmp_path / "t.md", tmp_path / "t.csv"
    argv = ["table", *map(str, runs), *map(str, extra), "--markdown", str(md), "--csv", str(table_csv)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert md.read_text() == out
    reports = [json.loads((r / "report.json").read_text()) for r in runs]
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| densenet")}
    tiny = [c.strip() for c in lines["densenet_bc16_k8"].split("|")[1:-1]]
    assert tiny[:4] == ["densenet_bc16_k8", "16", "8", "20,266"]
    assert tiny[5] == f"{reports[0]['test_error']:.2f} / -"  # C10+; no paper number for this model
    assert "bundled CIFAR-10 sample, 4 of 300 epochs, 128 training images" in tiny[-1]
    assert reports[0]["hardware"].endswith(" cores") and f"h on {reports[0]['hardware']}" in tiny[-1]
    assert ("C10+ d40-budget (6.00): data archive.tar.gz, 30 of 300 epochs, recipe budget, weight average, "
            "2.0 h on AMD EPYC 9R14, 2 cores") in lines["densenet40_k12"]
    bc100 = [c.strip() for c in lines["densenet_bc100_k12"].split("|")[1:-1]]
    assert bc100[3] == "0.77M" and bc100[4] == "- / 5.92"
    assert bc100[5] == "4.75 (mean of 2) / 4.51" and bc100[7] == "23.00 / 22.27"
    d121 = [c.strip() for c in lines["densenet121"].split("|")[1:-1]]
    assert d121[4:6] == ["25.50 / 25.02", "8.00 / 7.71"] and "4 of 90" not in d121[-1]
    rows = {r["model"]: r for r in csv.DictReader(table_csv.open())}
    assert float(rows["densenet_bc16_k8"]["cifar10+_error"]) == pytest.approx(reports[0]["test_error"])
    assert float(rows["densenet16_k8"]["cifar10+_error"]) == pytest.approx(reports[1]["test_error"])
    assert rows["densenet_bc100_k12"]["cifar10+_runs"] == "2" and rows["densenet_bc100_k12"]["cifar10+_paper"] == "4.51"
    assert rows["densenet_bc100_k12"]["svhn_error"] == "" and rows["densenet_bc100_k12"]["svhn_paper"] == "1.76"
    assert rows["densenet121"]["imagenet_top1_paper"] == "25.02" and rows["densenet121"]["parameters"] == "7978856"


def test_table_all_lists_every_paper_row(runs, capsys):
    assert main(["table", str(runs[0]), "--all"]) == 0
    out = capsys.readouterr().out
    for model in ("densenet40_k12", "densenet_bc190_k40", "densenet264"):
        assert f"| {model} " in out
    assert "| densenet40_k12     | 40    | 12 | 1.02M  | - / 7.00" in out and "not run" in out


def test_table_and_plot_refuse_a_run_without_report(runs, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.csv").write_text((runs[0] / "metrics.csv").read_text())
    for command in (["table"], ["plot", "--out", str(tmp_path / "p.png")]):
        assert main([*command, str(runs[0]), str(unfinished)]) == 2
        err = capsys.readouterr().err
        assert f"{unfinished} holds no report.json (the run has not finished" in err and "Traceback" not in err
    (unfinished / "report.json").write_text("{not json")
    assert main(["table", str(unfinished)]) == 2
    assert "report.json is not valid JSON" in capsys.readouterr().err
    assert main(["table", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


# ---------------------------------------------------------------------------- plot
def test_plot_overlays_curves_and_parameter_efficiency(runs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", *map(str, runs), "--out", str(out)]) == 0
    assert "curves-params.png" in capsys.readouterr().out
    assert png_size(out)[0] > 800 and png_size(tmp_path / "curves-params.png")[0] > 500
    # learning-rate drops are in the metrics the plot marks: 0.1, 0.1, 0.01, 0.001
    lrs = [float(r["lr"]) for r in csv.DictReader((runs[0] / "metrics.csv").open())]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])
    # one model: curves only
    single = tmp_path / "single.png"
    assert main(["plot", str(runs[0]), "--out", str(single), "--params-out", str(tmp_path / "pe.png")]) == 0
    assert "one model only" in capsys.readouterr().out
    assert png_size(single)[0] > 800 and not (tmp_path / "pe.png").exists()


def test_plot_draws_what_it_says(runs, tmp_path, monkeypatch):
    """The figure's lines are the runs' metrics: capture what reaches matplotlib."""
    import densenet.cli as cli

    drawn = []
    real = cli.plot_curves

    def spy(path, series, title=""):
        drawn.extend(series)
        real(path, series, title)

    monkeypatch.setattr(cli, "plot_curves", spy)
    assert main(["plot", *map(str, runs), "--out", str(tmp_path / "c.png")]) == 0
    assert [label.split(" ")[0] for label, _ in drawn] == ["densenet_bc16_k8", "densenet16_k8"]
    for (_label, rows), run in zip(drawn, runs):
        expected = list(csv.DictReader((run / "metrics.csv").open()))
        assert [r["test_error"] for r in rows] == [float(e["test_error"]) for e in expected]
        assert [r["train_loss"] for r in rows] == [float(e["train_loss"]) for e in expected]


# ---------------------------------------------------------------------------- docs/REPRODUCING.md
def test_reproducing_doc_has_every_row_of_tables_2_and_3():
    from densenet.analysis.paper import TABLE2, TABLE2_DATASETS, TABLE3

    doc = (Path(__file__).resolve().parents[1] / "docs" / "REPRODUCING.md").read_text()
    lines = [line for line in doc.splitlines() if line.startswith("| densenet")]
    for model, errors in TABLE2.items():
        for dataset, error in zip(TABLE2_DATASETS, errors):
            if error is None:
                continue
            row = [line for line in lines if f"--model {model} --dataset {dataset} " in line]
            assert len(row) == 1, (model, dataset)
            cells = [c.strip() for c in row[0].strip("|").split("|")]
            assert cells[:3] == [model, dataset, f"{error:.2f}"] and cells[-1], (model, dataset)
            assert all(float(h) > 0 for h in cells[4].split(" / "))  # an estimate, fp32 / bf16
    for model, (top1, top1_10, _, _) in TABLE3.items():
        row = [line for line in lines if f"--model {model} --dataset imagenet " in line]
        assert len(row) == 1 and f"{top1:.2f} / {top1_10:.2f}" in row[0]
