"""Training on real data: the shared CIFAR-10 JPEG copy (CI places it at ../shared/data)."""
import json
import os
from pathlib import Path

import pytest

from densenet.cli import main

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_ZIP = Path(os.environ.get("DENSENET_CIFAR10_ZIP", ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"))


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10_ZIP.is_file(), reason=f"the shared CIFAR-10 JPEG copy is not at {CIFAR10_ZIP}")
def test_small_densenet_learns_real_cifar10(tmp_path):
    """A small DenseNet-BC trained on 10,000 real training images for 5 epochs classifies 2,000
    held-out test images far above chance.

    Chance is 10%; with 2,000 test images its standard deviation is 0.7 points, so the 35% bar is
    over 35 standard deviations above chance, while this command measured 56.2% (2026-11-28,
    this 2-core machine, `python -m pytest -m slow tests/test_train_real.py -s`), leaving a
    margin of over 20 points for other seeds, thread counts and library builds. About 1.5 minutes
    on an idle machine (600 training images/s), far more when the cores are shared.
    """
    out = tmp_path / "real"
    code = main([
        "train", "--model", "densenet_bc16_k12", "--dataset", "cifar10+", "--data", str(CIFAR10_ZIP),
        "--train-subset", "10000", "--test-subset", "2000", "--epochs", "5", "--batch-size", "64",
        "--lr-milestones", "4", "--out", str(out), "--quiet", "--seed", "0",
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["test_accuracy"] >= 35.0, report
