"""Several small training runs on one CPU: side by side with a thread each, or one after another with all.

    python bench/bench_concurrent.py                      # BC-40, 2 runs, the CIFAR-10 copy in ../shared
    python bench/bench_concurrent.py --model densenet40_k12 --runs 2 --images 4096

A study of several short runs (issue 24's variants) can run them one at a time with every core, or
side by side with ``--threads 1`` each. This trains the same real `densenet train` command both ways
(float32, ``--recipe budget``, ``--train-subset IMAGES`` for 2 epochs; the first epoch warms up and is
not counted) and reports the images per second of the second epoch: alone with all threads, and summed
over the side-by-side runs, with their ratio. Nothing else should run meanwhile.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, model: str, data: Path, images: int, threads: int) -> subprocess.Popen:
    """Start one `densenet train` of 2 epochs on ``images`` training images."""
    cmd = [sys.executable, "-m", "densenet", "train", "--model", model, "--dataset", "cifar10+", "--data", str(data),
           "--recipe", "budget", "--amp", "off", "--epochs", "2", "--train-subset", str(images),
           "--test-subset", "256", "--threads", str(threads), "--seed", "0", "--quiet", "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def second_epoch_rate(procs: list[subprocess.Popen], outs: list[Path]) -> list[float]:
    """Wait for the runs; images per second of each one's second epoch (its ``metrics.csv``)."""
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"bench_concurrent: a run failed:\n{err}")
    rates = []
    for out in outs:
        with open(out / "metrics.csv", newline="") as f:
            rates.append(float(list(csv.DictReader(f))[1]["images_per_s"]))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="densenet_bc40_k12")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip")
    p.add_argument("--runs", type=int, default=2, help="side-by-side runs (default 2)")
    p.add_argument("--images", type=int, default=4096, help="training images per epoch (default 4096)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the run alone (default: all cores)")
    args = p.parse_args()
    if not args.data.exists():
        raise SystemExit(f"bench_concurrent: no data at {args.data}; pass --data PATH (the CIFAR-10 JPEG zip)")
    with tempfile.TemporaryDirectory() as tmp:
        alone = [Path(tmp, "alone")]
        (rate_alone,) = second_epoch_rate([train(alone[0], args.model, args.data, args.images, args.threads)], alone)
        outs = [Path(tmp, f"side{i}") for i in range(args.runs)]
        rates = second_epoch_rate([train(o, args.model, args.data, args.images, 1) for o in outs], outs)
    print(f"{args.model}, float32, batch 64, {args.images} images an epoch, {os.cpu_count()} cores")
    print(f"one run, {args.threads} threads: {rate_alone:.1f} images/s")
    print(f"{args.runs} runs side by side, 1 thread each: {' + '.join(f'{r:.1f}' for r in rates)} = "
          f"{sum(rates):.1f} images/s ({sum(rates) / rate_alone:.2f}x)")


if __name__ == "__main__":
    main()
