"""Print the card's per-epoch table (markdown) from a run's metrics.csv.

Usage: python docs/runs/cifar10-bc100-k12-budget50/epochs.py [RUN_DIR]  (default: this folder)
"""
import csv
import sys
from pathlib import Path


def percent(value: str) -> str:
    return f"{float(value):.2f}%" if value else "-"


def main() -> None:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    print("| epoch | lr | train loss | train error | test error | average's test error | minutes | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    with open(run / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            print(
                f"| {row['epoch']} | {float(row['lr']):.4f} | {float(row['train_loss']):.3f} | {percent(row['train_error'])} "
                f"| {percent(row['test_error'])} | {percent(row['ema_test_error'])} "
                f"| {float(row['seconds']) / 60:.1f} | {float(row['images_per_s']):.1f} |"
            )


if __name__ == "__main__":
    main()
