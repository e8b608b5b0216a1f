"""Chaos run: training on real data (the shared CIFAR-10 JPEG copy), SIGKILLed at random moments and
resumed each time, ends bit-identical to a run never interrupted."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from densenet.io.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_ZIP = Path(os.environ.get("DENSENET_CIFAR10_ZIP", ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"))
ARGS = ["train", "--model", "densenet_bc16_k8", "--dataset", "cifar10+", "--data", str(CIFAR10_ZIP),
        "--train-subset", "1280", "--test-subset", "500", "--batch-size", "64", "--epochs", "3",
        "--checkpoint-every", "2", "--deterministic", "--threads", "1", "--quiet", "--seed", "5"]
KILLS = 4


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "densenet", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10_ZIP.is_file(), reason=f"the shared CIFAR-10 JPEG copy is not at {CIFAR10_ZIP}")
def test_killed_at_random_moments_and_resumed_ends_bit_identical(tmp_path):
    from densenet.data import build_data

    build_data("cifar10+", CIFAR10_ZIP, batch_size=64)  # decoded once into the cache: every run below starts alike
    reference = tmp_path / "reference"
    t0 = time.perf_counter()
    proc = start([*ARGS, "--out", str(reference)])
    log, _ = proc.communicate(timeout=900)
    duration = time.perf_counter() - t0
    assert proc.returncode == 0, log

    out = tmp_path / "chaos"
    rng = random.Random(2026)
    kills, resumes = 0, 0
    for _ in range(KILLS):
        resuming = (out / "checkpoint.pt").exists() or (out / "checkpoint.prev.pt").exists()
        proc = start(["train", "--resume", str(out), "--quiet"] if resuming else [*ARGS, "--out", str(out), "--force"])
        resumes += resuming
        time.sleep(rng.uniform(0.15, 0.85) * duration)  # anywhere: loading data, a step, a checkpoint write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
    proc = start(["train", "--resume", str(out), "--quiet"])
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log
    print(f"chaos run: {kills} kills at random moments, {resumes + 1} resumes; reference run {duration:.1f} s")
    assert kills >= 3
    a, b = load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    assert (a["epoch"], b["epoch"]) == (3, 3)
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, different[:5]
    assert [r["test_error"] for r in a["history"]] == [r["test_error"] for r in b["history"]]
